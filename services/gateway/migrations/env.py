"""Alembic environment of the gateway's store."""

from plinth_common.db import run_alembic_env
from services.gateway.store import metadata

run_alembic_env(metadata)
