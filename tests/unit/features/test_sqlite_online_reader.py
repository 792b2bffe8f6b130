"""The SQLite fast path on a table laid out as Feast's SQLite online store lays it out."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from feast.protos.feast.types.Value_pb2 import Value

from plinth_common.errors import FailedPrecondition
from services.features.domain import FieldStatus
from services.features.sqlite_online_reader import SqliteOnlineReader, ViewQuery

TABLE = "proj_driver_stats"
STAMP = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def online_store(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "online_store.db"
    conn = sqlite3.connect(path)
    conn.execute(
        f"CREATE TABLE {TABLE} (entity_key BLOB, feature_name TEXT, value BLOB, "
        "event_ts timestamp, created_ts timestamp, PRIMARY KEY(entity_key, feature_name))"
    )
    rows = [
        (b"k1", "conv_rate", Value(double_val=0.5).SerializeToString()),
        (b"k1", "trips", Value(int64_val=7).SerializeToString()),
        (b"k2", "conv_rate", Value(double_val=0.25).SerializeToString()),
    ]
    conn.executemany(
        f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?, ?)",
        [(*r, "2024-01-02 03:04:05", None) for r in rows],
    )
    conn.commit()
    conn.close()
    yield path


class Worker:
    """run_blocking that counts the reads sent to a worker thread."""

    def __init__(self, before: Callable[[], object] = lambda: None) -> None:
        self.calls = 0
        self._before = before

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.calls += 1
        self._before()
        return await asyncio.to_thread(fn, *args)


def query(*keys: bytes, features: tuple[str, ...] = ("conv_rate", "trips")) -> ViewQuery:
    return ViewQuery(table=TABLE, keys=list(keys), features=features, filter_features=False)


async def test_values_statuses_and_times_per_key_read_on_the_loop(online_store: Path) -> None:
    worker = Worker()
    reader = SqliteOnlineReader(str(online_store), worker, inline_max_keys=8)
    [read] = await reader.read([query(b"k1", b"k2", b"absent")])
    assert read["conv_rate"] == (
        [0.5, 0.25, None],
        [FieldStatus.PRESENT, FieldStatus.PRESENT, FieldStatus.NOT_FOUND],
        [STAMP, STAMP, None],
    )
    assert read["trips"][0] == [7, None, None]
    assert worker.calls == 0


async def test_a_large_read_goes_to_a_worker_thread(online_store: Path) -> None:
    worker = Worker()
    reader = SqliteOnlineReader(str(online_store), worker, inline_max_keys=1)
    [read] = await reader.read([query(b"k1", b"k2", features=("conv_rate",))])
    assert read["conv_rate"][0] == [0.5, 0.25]
    assert worker.calls == 1


async def test_a_small_read_meeting_a_writers_lock_waits_in_a_worker_thread(
    online_store: Path,
) -> None:
    writer = sqlite3.connect(online_store, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN EXCLUSIVE")
    worker = Worker(before=lambda: writer.execute("COMMIT"))
    try:
        reader = SqliteOnlineReader(str(online_store), worker, inline_max_keys=8)
        [read] = await reader.read([query(b"k1")])
    finally:
        writer.close()
    assert worker.calls == 1 and read["conv_rate"][0] == [0.5]


async def test_a_missing_online_table_asks_for_an_apply(online_store: Path) -> None:
    reader = SqliteOnlineReader(str(online_store), Worker(), inline_max_keys=8)
    missing = ViewQuery(table="proj_other", keys=[b"k1"], features=("x",), filter_features=True)
    with pytest.raises(FailedPrecondition, match="apply the repository again"):
        await reader.read([missing])
