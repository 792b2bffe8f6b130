"""Alembic environment of the features service's store."""

from plinth_common.db import run_alembic_env
from services.features.store import metadata

run_alembic_env(metadata)
