"""Alembic environment of the registry's store."""

from plinth_common.db import run_alembic_env
from services.registry.store import metadata

run_alembic_env(metadata)
