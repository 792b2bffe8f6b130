"""Integration fixtures: a fresh PostgreSQL database per test (from ``PLINTH_TEST_POSTGRES_URL``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url


def _postgres_url() -> str:
    url = os.environ.get("PLINTH_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("PLINTH_TEST_POSTGRES_URL is not set (CI sets it; see .ci/run)")
    return url


@pytest_asyncio.fixture(loop_scope="session")
async def postgres_database() -> AsyncIterator[str]:
    """An empty database on the test PostgreSQL server; yields its asyncpg URL, drops it after."""
    import asyncpg

    admin_url = make_url(_postgres_url())
    name = f"plinth_test_{uuid.uuid4().hex[:10]}"
    dsn = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield admin_url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
