"""The features service's own store: the outbox and processed-events tables, nothing else.

Entities, feature views and materialization state live in Feast's registry; this database only
makes the service's events transactional.
"""

from __future__ import annotations

import sqlalchemy as sa

from plinth_common.events import event_tables

metadata = sa.MetaData()
outbox_table, processed_table = event_tables(metadata)
