"""The registry's own store: the outbox and processed-events tables, nothing else.

Models, versions, aliases and policies live in MLflow (see ``mlflow_store``); this database
only makes the registry's events transactional and its consumer idempotent.
"""

from __future__ import annotations

import sqlalchemy as sa

from plinth_common.events import event_tables

metadata = sa.MetaData()
outbox_table, processed_table = event_tables(metadata)
