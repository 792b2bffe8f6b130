"""The platform monitor's per-minute buckets in the gateway's database (SQLite or PostgreSQL).

``slo_buckets`` holds good/total events per SLO, scope and minute; ``monitor_buckets`` the
report's figures (finished jobs, histogram bucket counts, registry calls) per key and minute.
Both are written by one scrape per interval (one transaction) and read by range of minutes; a
minute's row grows by addition when several scrapes fall in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from plinth_common.db import Database
from plinth_common.slo import EventCounts
from services.gateway.monitor import ReportKey

metadata = sa.MetaData()

slo_buckets = sa.Table(
    "slo_buckets",
    metadata,
    sa.Column("slo", sa.String(63), primary_key=True),
    sa.Column("scope", sa.String(128), primary_key=True),
    sa.Column("start", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("good", sa.BigInteger, nullable=False),
    sa.Column("total", sa.BigInteger, nullable=False),
    sa.Index("ix_slo_buckets_start", "start"),
)

monitor_buckets = sa.Table(
    "monitor_buckets",
    metadata,
    sa.Column("figure", sa.String(63), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("start", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
    sa.Index("ix_monitor_buckets_start", "start"),
)


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class SqlMonitorStore:
    """:class:`services.gateway.monitor.MonitorStore` on the gateway's database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _insert(self, table: sa.Table) -> sa.dialects.sqlite.Insert | sa.dialects.postgresql.Insert:
        if self._db.engine.dialect.name == "postgresql":
            return pg_insert(table)
        return sqlite_insert(table)

    async def add(
        self,
        minute: datetime,
        slis: Mapping[tuple[str, str], tuple[int, int]],
        figures: Mapping[ReportKey, float],
    ) -> None:
        """Adds one scrape's increments to the buckets of ``minute`` (an upsert per row)."""
        async with self._db.transaction() as session:
            if slis:
                rows = [
                    {"slo": slo, "scope": scope, "start": minute, "good": good, "total": total}
                    for (slo, scope), (good, total) in slis.items()
                ]
                insert = self._insert(slo_buckets)
                await session.execute(
                    insert.on_conflict_do_update(
                        index_elements=["slo", "scope", "start"],
                        set_={
                            "good": slo_buckets.c.good + insert.excluded.good,
                            "total": slo_buckets.c.total + insert.excluded.total,
                        },
                    ),
                    rows,
                )
            if figures:
                rows_f = [
                    {"figure": figure, "key": key[:255], "start": minute, "value": value}
                    for (figure, key), value in figures.items()
                ]
                insert_f = self._insert(monitor_buckets)
                await session.execute(
                    insert_f.on_conflict_do_update(
                        index_elements=["figure", "key", "start"],
                        set_={"value": monitor_buckets.c.value + insert_f.excluded.value},
                    ),
                    rows_f,
                )

    async def slo_counts(
        self, slo: str, start: datetime, end: datetime
    ) -> dict[str, list[EventCounts]]:
        """The buckets of ``slo`` starting in ``[start, end)``, per scope, oldest first."""
        query = (
            sa.select(
                slo_buckets.c.scope, slo_buckets.c.start, slo_buckets.c.good, slo_buckets.c.total
            )
            .where(
                slo_buckets.c.slo == slo, slo_buckets.c.start >= start, slo_buckets.c.start < end
            )
            .order_by(slo_buckets.c.scope, slo_buckets.c.start)
        )
        found: dict[str, list[EventCounts]] = {}
        async with self._db.sessions() as session:
            for row in (await session.execute(query)).all():
                found.setdefault(row.scope, []).append(
                    EventCounts(_utc(row.start), int(row.good), int(row.total))
                )
        return found

    async def figure_sums(self, figure: str, start: datetime, end: datetime) -> dict[str, float]:
        """The sum of a report figure's buckets in ``[start, end)``, per key."""
        query = (
            sa.select(monitor_buckets.c.key, sa.func.sum(monitor_buckets.c.value))
            .where(
                monitor_buckets.c.figure == figure,
                monitor_buckets.c.start >= start,
                monitor_buckets.c.start < end,
            )
            .group_by(monitor_buckets.c.key)
        )
        async with self._db.sessions() as session:
            return {key: float(total) for key, total in (await session.execute(query)).all()}

    async def prune(self, before: datetime) -> int:
        """Deletes buckets that start before ``before``; returns how many rows went."""
        async with self._db.transaction() as session:
            gone = 0
            for table in (slo_buckets, monitor_buckets):
                result = await session.execute(sa.delete(table).where(table.c.start < before))
                gone += int(getattr(result, "rowcount", 0) or 0)
        return gone
