"""The features service's own store: the outbox and processed-events tables, and freshness.

Entities, feature views and materialization windows live in Feast's registry; this database
makes the service's events transactional and keeps what the registry does not: when each
view last received data through a push (and, beside it, each materialization's end), so the
freshness metric is right from the first scrape after a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from plinth_common.db import Database
from plinth_common.events import event_tables

__all__ = ["SqlFreshnessStore", "freshness_table", "outbox_table", "processed_table"]

metadata = sa.MetaData()
outbox_table, processed_table = event_tables(metadata)

freshness_table = sa.Table(
    "feature_freshness",
    metadata,
    sa.Column("feature_view", sa.String(128), primary_key=True),
    sa.Column("data_until", sa.DateTime(timezone=True), nullable=False),
)


class SqlFreshnessStore:
    """Each feature view's newest data time in the service's database.

    Args:
        db: the service's database.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    async def newest(self) -> dict[str, datetime]:
        """Each recorded view's newest data time (UTC)."""
        async with self._db.read() as session:
            rows = await session.execute(
                sa.select(freshness_table.c.feature_view, freshness_table.c.data_until)
            )
            return {view: _utc(until) for view, until in rows.tuples()}

    async def record(self, views: Sequence[str], until: datetime) -> None:
        """Raises each view's newest data time to ``until`` (never lowers it: two replicas
        sharing one database may record out of order)."""
        rows = [
            {"feature_view": view, "data_until": until.astimezone(UTC)}
            for view in dict.fromkeys(views)
        ]
        if not rows:
            return
        insert = pg_insert if self._db.engine.dialect.name == "postgresql" else sqlite_insert
        statement = insert(freshness_table)
        newer = statement.excluded.data_until > freshness_table.c.data_until
        async with self._db.transaction() as session:
            await session.execute(
                statement.on_conflict_do_update(
                    index_elements=["feature_view"],
                    set_={
                        "data_until": sa.case(
                            (newer, statement.excluded.data_until),
                            else_=freshness_table.c.data_until,
                        )
                    },
                ),
                rows,
            )

    async def forget(self, views: Sequence[str]) -> None:
        """Drops the views' records."""
        async with self._db.transaction() as session:
            await session.execute(
                sa.delete(freshness_table).where(freshness_table.c.feature_view.in_(list(views)))
            )


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every value written is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)
