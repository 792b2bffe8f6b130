"""Alembic environment of the scheduler's store."""

from plinth_common.db import run_alembic_env
from services.scheduler.store import metadata

run_alembic_env(metadata)
