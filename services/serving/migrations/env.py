"""Alembic environment of the serving store."""

from plinth_common.db import run_alembic_env
from services.serving.store import metadata

run_alembic_env(metadata)
