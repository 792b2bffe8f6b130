"""SQL stores: async engines (SQLite by default, PostgreSQL by URL), transactions, migrations."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import NullPool


def _prepare_sqlite(url: str) -> dict[str, Any]:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    return {"connect_args": {"timeout": 30}}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the one writer; NORMAL sync is durable across process crashes
    # (only a power loss can drop the last commits) and keeps commits cheap.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """An async engine plus sessions, with hooks that run after each commit.

    Args:
        url: SQLAlchemy async URL (``sqlite+aiosqlite:///...`` or ``postgresql+asyncpg://...``).
    SQL statements become spans when :func:`plinth_common.telemetry.setup_telemetry` ran first.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = _prepare_sqlite(url) if self.is_sqlite else {"pool_pre_ping": True}
        if self.is_sqlite and make_url(url).database in (None, "", ":memory:"):
            kwargs["poolclass"] = NullPool
        # Looked up at call time: the OpenTelemetry instrumentation wraps it after import.
        self.engine: AsyncEngine = sa_asyncio.create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._after_commit: list[Callable[[Mapping[str, Any]], None]] = []

    def on_commit(self, callback: Callable[[Mapping[str, Any]], None]) -> None:
        """Registers a cheap, synchronous callback run after every :meth:`transaction` commits.

        It gets the session's ``info`` dict, where the transaction's code may leave notes
        (the outbox notes that it wrote, so its relay wakes only then).
        """
        self._after_commit.append(callback)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self.sessions() as session:
            async with session.begin():
                yield session
            info = dict(session.info)
        for callback in self._after_commit:
            callback(info)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only."""
        async with self.sessions() as session:
            yield session

    async def migrate(self, script_location: Path) -> None:
        """Brings the schema to the newest Alembic revision in ``script_location``."""
        config = Config()
        config.set_main_option("script_location", str(script_location))

        def upgrade(connection: Connection) -> None:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

        async with self.engine.begin() as connection:
            await connection.run_sync(upgrade)

    async def close(self) -> None:
        """Closes every pooled connection."""
        await self.engine.dispose()


def run_alembic_env(target_metadata: Any) -> None:
    """The body of every service's ``migrations/env.py``: migrate on the connection passed in."""
    from alembic import context

    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("migrations run through Database.migrate(), which passes a connection")
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
