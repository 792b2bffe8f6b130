"""The fast online read path on Feast's SQLite online store: its tables read directly.

Feast's ``SqliteOnlineStore.online_read`` builds an ``EntityKey`` protobuf per key and converts
timestamps inside sqlite3. Here the same table, the same rows and the same query, minus those
per-row costs: keys are serialized as Feast serializes them (:class:`KeySerializer`, checked
against Feast's own function), values decoded once, timestamps converted as Feast converts them,
and only the requested features fetched when few are wanted.

Small reads run on the caller's event loop without ever waiting for a lock; larger ones, and any
that meet a writer's lock, run in a worker thread.
"""

from __future__ import annotations

import sqlite3
import struct
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from plinth_common.errors import FailedPrecondition
from services.features.domain import FieldStatus
from services.features.feast_values import SCALAR_KINDS, JoinKey, python_value, value_proto

__all__ = ["KeySerializer", "LockBusy", "SqliteOnlineReader", "SqliteRows", "ViewQuery"]

RunBlocking = Callable[..., Awaitable[Any]]
#: Per distinct key of one view query: values, statuses and event times of one feature.
FeatureLists = tuple[list[Any], list[int], list[datetime | None]]

_PRESENT, _NOT_FOUND = int(FieldStatus.PRESENT), int(FieldStatus.NOT_FOUND)
_MAX_CACHED_TIMES = 100_000


class KeySerializer:
    """Feast's entity-key serialization (v3) for one view's join keys, without the protobufs.

    ``serialize_entity_key`` builds bytes from an ``EntityKey`` protobuf; for the scalar key
    types here the bytes are a constant prefix (the sorted key names) followed by each value's
    type, length and bytes. :meth:`verified` compares with Feast's own function, so a change in
    Feast's format turns the fast path off instead of reading wrong keys.
    """

    _PACK: ClassVar[dict[str, tuple[str, int]]] = {"INT64": ("<q", 4), "INT32": ("<i", 3)}

    def __init__(self, join_keys: Sequence[JoinKey]) -> None:
        ordered = sorted(join_keys, key=lambda k: k.name)
        self._order = [join_keys.index(k) for k in ordered]
        parts = [struct.pack("<I", len(ordered))]
        for key in ordered:
            encoded = key.name.encode("utf8")
            parts += [struct.pack("<II", 2, len(encoded)), encoded]  # 2: ValueType.STRING
        self._prefix = b"".join(parts)
        self._packers: list[Callable[[Any], bytes]] = [self._packer(k.type_name) for k in ordered]

    @classmethod
    def _packer(cls, type_name: str) -> Callable[[Any], bytes]:
        if type_name == "STRING":
            return lambda v: (lambda b: struct.pack("<II", 2, len(b)) + b)(v.encode("utf8"))
        fmt, value_type = cls._PACK[type_name]
        packed = struct.Struct("<II" + fmt[1:])
        size = struct.calcsize(fmt)
        return lambda v: packed.pack(value_type, size, v)

    def __call__(self, key: tuple[Any, ...]) -> bytes:
        if len(self._packers) == 1:
            return self._prefix + self._packers[0](key[0])
        return self._prefix + b"".join(
            pack(key[i]) for pack, i in zip(self._packers, self._order, strict=True)
        )

    @classmethod
    def verified(cls, join_keys: Sequence[JoinKey], version: int) -> KeySerializer | None:
        """A serializer that agrees with Feast on sample keys, or None."""
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        if version != 3 or any(k.type_name not in ("INT64", "INT32", "STRING") for k in join_keys):
            return None
        samples = {"INT64": (-(2**40) - 3, 1001), "INT32": (-7, 2**30), "STRING": ("", "driver-ü")}
        serializer = cls(join_keys)
        for i in range(2):
            key = tuple(samples[k.type_name][i] for k in join_keys)
            proto = EntityKey(
                join_keys=[k.name for k in join_keys],
                entity_values=[
                    value_proto(Value, k.proto_field, v)
                    for k, v in zip(join_keys, key, strict=True)
                ],
            )
            if serializer(key) != serialize_entity_key(
                proto, entity_key_serialization_version=version
            ):
                return None
        return serializer


class LockBusy(Exception):
    """A no-wait read met a writer's lock (a materialization or push committing)."""


Query = tuple[str, list[bytes], tuple[str, ...] | None]
Row = tuple[bytes, str, bytes, Any]


class SqliteRows:
    """Reads Feast's SQLite online tables directly, on read-only connections of its own.

    Each thread has its own connections: a waiting one (busy timeout 10 s, for worker threads)
    and a no-wait one (busy timeout 0) for bounded reads on the event loop, which raise
    :class:`LockBusy` instead of waiting for a writer.

    Args:
        path: the online store's database file.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._local = threading.local()

    def _connection(self, wait: bool) -> sqlite3.Connection:
        name = "waiting" if wait else "nowait"
        conn = getattr(self._local, name, None)
        if conn is None:
            # Read-only: serving can never write to Feast's store.
            conn = sqlite3.connect(
                f"file:{self._path}?mode=ro",
                uri=True,
                timeout=10.0 if wait else 0.0,
                check_same_thread=False,
            )
            setattr(self._local, name, conn)
        return conn

    def fetch(self, queries: Sequence[Query], wait: bool = True) -> list[list[Row]]:
        """For each (table, serialized keys, features or None for all), the rows.

        Raises:
            LockBusy: ``wait`` is False and a writer holds the database.
            FailedPrecondition: a view's online table is missing.
            sqlite3.OperationalError: the database cannot be read (the caller maps it).
        """
        conn = self._connection(wait)
        out = []
        for table, keys, features in queries:
            sql = (
                "SELECT entity_key, feature_name, value, event_ts FROM "
                f"{_quote(table)} WHERE entity_key IN ({','.join('?' * len(keys))})"
            )
            params: list[Any] = keys
            if features is not None:
                sql += f" AND feature_name IN ({','.join('?' * len(features))})"
                params = [*keys, *features]
            try:
                out.append(conn.execute(sql, params).fetchall())
            except sqlite3.OperationalError as exc:
                message = str(exc)
                if "no such table" in message:
                    raise FailedPrecondition(
                        f"the online table {table!r} does not exist: apply the repository again"
                    ) from None
                if not wait and "locked" in message:
                    raise LockBusy(message) from None
                raise
        return out


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class ViewQuery:
    """One feature view's part of a read.

    Attributes:
        table: the view's online table.
        keys: distinct entity keys, serialized.
        features: the features wanted, in request order.
        filter_features: fetch only ``features`` (cheaper when few of the view's are wanted).
    """

    table: str
    keys: list[bytes]
    features: tuple[str, ...]
    filter_features: bool


class SqliteOnlineReader:
    """Reads feature values from Feast's SQLite online store.

    Args:
        path: the online store's database file.
        run_blocking: runs a blocking callable in a worker thread and awaits it.
        inline_max_keys: reads of at most this many keys run on the caller's loop, never
            waiting for a lock (0: every read in a worker thread).
    """

    def __init__(self, path: str, run_blocking: RunBlocking, *, inline_max_keys: int = 0) -> None:
        from feast.protos.feast.types.Value_pb2 import Value

        self._rows = SqliteRows(path)
        self._run = run_blocking
        self._inline_max_keys = inline_max_keys
        self._decode = Value.FromString
        self._times: dict[Any, datetime] = {}

    async def read(self, queries: Sequence[ViewQuery]) -> list[dict[str, FeatureLists]]:
        """Per query, per wanted feature: values, statuses and event times of each key."""
        plain = [(q.table, q.keys, q.features if q.filter_features else None) for q in queries]
        fetched = None
        if sum(len(q.keys) for q in queries) <= self._inline_max_keys:
            # Small reads run on the loop: a few index lookups in a file the page cache holds,
            # cheaper than the two thread handoffs (and their scheduling delays on a busy
            # machine) that a worker thread costs. They never wait for a lock: when a writer
            # is committing, the read goes to a worker thread like a large one.
            try:
                fetched = self._rows.fetch(plain, wait=False)
            except LockBusy:
                fetched = None
        if fetched is None:
            fetched = await self._run(self._rows.fetch, plain)
        return [self._decoded(q, rows) for q, rows in zip(queries, fetched, strict=True)]

    def _decoded(self, query: ViewQuery, rows: list[Row]) -> dict[str, FeatureLists]:
        decode, times = self._decode, self._times
        index = {key: i for i, key in enumerate(query.keys)}
        width = len(query.keys)
        per_feature: dict[str, FeatureLists] = {
            f: ([None] * width, [_NOT_FOUND] * width, [None] * width) for f in query.features
        }
        for entity_key, feature, blob, stamp in rows:
            lists = per_feature.get(feature)
            if lists is None:
                continue
            slot = index[entity_key]
            values, statuses, stamps = lists
            stored = decode(blob)
            kind = stored.WhichOneof("val")
            values[slot] = getattr(stored, kind) if kind in SCALAR_KINDS else python_value(stored)
            statuses[slot] = _PRESENT
            moment = times.get(stamp)
            if moment is None:
                moment = times[stamp] = feast_sqlite_time(stamp)
                if len(times) > _MAX_CACHED_TIMES:
                    times.clear()
                    times[stamp] = moment
            stamps[slot] = moment
        return per_feature


def feast_sqlite_time(stamp: Any) -> datetime:
    """An ``event_ts`` cell as Feast's SQLite store returns it (its converter, then UTC)."""
    if isinstance(stamp, bytes):
        stamp = int(stamp)
    if isinstance(stamp, str):
        parsed = datetime.fromisoformat(stamp)
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.fromtimestamp(int(stamp)).replace(tzinfo=UTC)
