"""Online feature reads on Feast's online stores, with the per-request work cut to the bone.

``FeatureStore.get_online_features`` resolves references, converts every entity value to a
protobuf, sorts and groups rows, builds a response protobuf and then converts it again. Here:

- a request's feature references resolve once into an :class:`OnlinePlan` (cached);
- entity values are checked and converted once per distinct key;
- on Feast's SQLite online store, the rows are read from Feast's own tables with Feast's query
  (:class:`SqliteRows`), keys serialized as Feast serializes them (:class:`KeySerializer`,
  checked against Feast's function), timestamps converted as Feast converts them;
- on stores with an async client (Redis), Feast's ``online_read_async``; on others, Feast's
  ``online_read`` in a worker thread.

So values, statuses and event timestamps are Feast's own. References the fast path does not
cover (on-demand views, projected join keys, versioned references, entityless views, other key
types) are served by ``FeatureStore.get_online_features`` itself, in a worker thread.
"""

from __future__ import annotations

import math
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    import feast

__all__ = [
    "FieldStatus",
    "OnlineColumn",
    "OnlinePlan",
    "OnlinePlanner",
    "OnlineReader",
    "parse_feature_refs",
]

MAX_ENTITY_ROWS = 10_000
_MAX_EXACT_INT = 2**53


class FieldStatus(IntEnum):
    """Status of one value, as Feast reports it (the numbers are ``plinth.features.v1``'s)."""

    PRESENT = 1
    NOT_FOUND = 2
    NULL_VALUE = 3
    OUTSIDE_MAX_AGE = 4


@dataclass(slots=True)
class OnlineColumn:
    """One requested feature across the entity rows.

    Attributes:
        name: the reference as requested (``view:feature``).
        values: Python values (None when not found or null), one per entity row.
        statuses: one :class:`FieldStatus` per entity row.
        event_times: the row's event timestamp (UTC), None when not found.
    """

    name: str
    values: list[Any] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    event_times: list[datetime | None] = field(default_factory=list)


def parse_feature_refs(
    refs: Sequence[str], *, field_name: str = "features"
) -> list[tuple[str, str]]:
    """Splits ``view:feature`` references.

    Raises:
        InvalidArgument: empty list, malformed or duplicate reference.
    """
    if not refs:
        raise InvalidArgument(
            field_name, "at least one feature reference (view:feature) is required"
        )
    seen: set[str] = set()
    parsed: list[tuple[str, str]] = []
    for i, ref in enumerate(refs):
        view, sep, feature = ref.partition(":")
        if not sep or not view or not feature or ":" in feature:
            raise InvalidArgument(
                f"{field_name}[{i}]", f"{ref!r} is not a 'view:feature' reference"
            )
        if ref in seen:
            raise InvalidArgument(f"{field_name}[{i}]", f"{ref!r} is requested twice")
        seen.add(ref)
        parsed.append((view, feature))
    return parsed


# --- entity keys -------------------------------------------------------------------------------

_MISSING = object()


def _int_key(limit: int) -> Callable[[Any, str], int]:
    def convert(value: Any, where: str) -> int:
        if type(value) is float and value.is_integer() and abs(value) <= min(limit, _MAX_EXACT_INT):
            return int(value)
        if type(value) is int and abs(value) <= limit:
            return value
        if type(value) is str and limit > 2**31:  # int64 as a decimal string, as proto3 JSON does
            try:
                number = int(value, 10)
            except ValueError:
                pass
            else:
                if abs(number) < 2**63:
                    return number
        raise InvalidArgument(where, f"expected an integer entity key, got {_describe(value)}")

    return convert


def _string_key(value: Any, where: str) -> str:
    if type(value) is str:
        return value
    raise InvalidArgument(where, f"expected a string entity key, got {_describe(value)}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class JoinKey:
    """A join key of a feature view: its name, Feast value type and converters."""

    name: str
    type_name: str
    proto_field: str
    convert: Callable[[Any, str], Any]


# Key types the fast path serves: Feast ValueType name -> (EntityKey value field, converter).
_KEY_TYPES: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "INT64": ("int64_val", _int_key(2**63 - 1)),
    "INT32": ("int32_val", _int_key(2**31 - 1)),
    "STRING": ("string_val", _string_key),
}


def _join_key(name: str, value_type: Any) -> JoinKey | None:
    """The :class:`JoinKey` for a Feast ``ValueType``; None for types left to Feast's own path."""
    found = _KEY_TYPES.get(value_type.name)
    if found is None:
        return None
    return JoinKey(name=name, type_name=value_type.name, proto_field=found[0], convert=found[1])


# --- plans ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ViewRead:
    """What one online read of one feature view needs.

    Attributes:
        view: the Feast feature view.
        features: feature names to return, in request order.
        columns: the output column of each feature.
        join_keys: the view's join keys.
    """

    view: Any
    features: tuple[str, ...]
    columns: tuple[int, ...]
    join_keys: tuple[JoinKey, ...]


@dataclass(frozen=True, slots=True)
class OnlinePlan:
    """A resolved request: the references and how to read them.

    Attributes:
        refs: the references as requested.
        reads: one per feature view, when every reference is on the fast path.
        fallback: True when Feast's ``get_online_features`` must serve the request.
        join_keys: every join key the fast path reads, by name.
    """

    refs: tuple[str, ...]
    reads: tuple[ViewRead, ...]
    fallback: bool
    join_keys: Mapping[str, JoinKey]


class OnlinePlanner:
    """Resolves feature references against Feast's registry, caching the result.

    Plans are dropped when the registry changes through this service (:meth:`invalidate`) and
    after ``ttl_s`` seconds, which bounds how long a change made behind the service's back
    (another process applying to the same registry) goes unnoticed.

    Args:
        store: the Feast feature store.
        ttl_s: lifetime of a cached plan.
        max_plans: cached plans kept (least recently used dropped first).
    """

    def __init__(
        self, store: feast.FeatureStore, *, ttl_s: float = 10.0, max_plans: int = 1024
    ) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._max_plans = max_plans
        self._plans: OrderedDict[tuple[str, ...], tuple[float, OnlinePlan]] = OrderedDict()

    def invalidate(self) -> None:
        """Forgets every plan (after an apply)."""
        self._plans.clear()

    def plan(self, refs: Sequence[str]) -> OnlinePlan:
        """The plan for ``refs`` (cached).

        Raises:
            InvalidArgument: malformed references.
            NotFound: an unknown feature view or feature, naming it.
            FailedPrecondition: a feature view that is not served online.
        """
        key = tuple(refs)
        now = time.monotonic()
        cached = self._plans.get(key)
        if cached is not None and now - cached[0] < self._ttl_s:
            self._plans.move_to_end(key)
            return cached[1]
        plan = self._build(key)
        self._plans[key] = (now, plan)
        self._plans.move_to_end(key)
        while len(self._plans) > self._max_plans:
            self._plans.popitem(last=False)
        return plan

    def _build(self, refs: tuple[str, ...]) -> OnlinePlan:
        from feast import FeatureView, OnDemandFeatureView
        from feast.errors import FeatureViewNotFoundException

        parsed = parse_feature_refs(refs)
        by_view: dict[str, list[tuple[str, int]]] = {}
        for column, (view_name, feature) in enumerate(parsed):
            by_view.setdefault(view_name, []).append((feature, column))

        fallback = False
        reads: list[ViewRead] = []
        join_keys: dict[str, JoinKey] = {}
        registry, project = self._store.registry, self._store.project
        for view_name, wanted in by_view.items():
            if "@" in view_name:  # a versioned reference: Feast resolves the version
                fallback = True
                continue
            try:
                view: Any = registry.get_any_feature_view(view_name, project, allow_cache=True)
            except FeatureViewNotFoundException:
                raise NotFound("feature view", view_name) from None
            known = {f.name for f in view.features}
            for feature, _ in wanted:
                if feature not in known:
                    raise NotFound("feature", f"{view_name}:{feature}")
            if isinstance(view, OnDemandFeatureView):
                fallback = True
                continue
            if isinstance(view, FeatureView) and not view.online:
                raise FailedPrecondition(
                    f"feature view {view_name!r} is not served online (online=False)"
                )
            keys = [_join_key(c.name, c.dtype.to_value_type()) for c in view.entity_columns]
            if not keys or None in keys or view.projection.join_key_map:
                fallback = True
                continue
            typed = tuple(k for k in keys if k is not None)
            for k in typed:
                join_keys[k.name] = k
            reads.append(
                ViewRead(
                    view=view,
                    features=tuple(f for f, _ in wanted),
                    columns=tuple(c for _, c in wanted),
                    join_keys=typed,
                )
            )
        return OnlinePlan(refs=refs, reads=tuple(reads), fallback=fallback, join_keys=join_keys)


# --- reads ---------------------------------------------------------------------------------------

# Feast's FieldStatus numbers (feast.serving.FieldStatus) -> ours.
_FROM_FEAST_STATUS = {
    1: FieldStatus.PRESENT,
    2: FieldStatus.NULL_VALUE,
    3: FieldStatus.NOT_FOUND,
    4: FieldStatus.OUTSIDE_MAX_AGE,
}
_SCALAR_KINDS = frozenset(
    {"int64_val", "int32_val", "float_val", "double_val", "string_val", "bool_val", "bytes_val"}
)


def python_value(value: Any) -> Any:
    """A Feast ``ValueProto`` as the Python value ``OnlineResponse.to_dict`` gives."""
    kind = value.WhichOneof("val")
    if kind in _SCALAR_KINDS:
        return getattr(value, kind)
    if kind is None or kind == "null_val":
        return None
    from feast.type_map import feast_value_type_to_python_type

    return feast_value_type_to_python_type(value)


@dataclass(slots=True)
class _KeyedRead:
    """The distinct entity keys of one view read, and where each request row points."""

    read: ViewRead
    keys: list[tuple[Any, ...]]
    positions: list[int]


class KeySerializer:
    """Feast's entity-key serialization (v3) for one view's join keys, without the protobufs.

    ``serialize_entity_key`` builds bytes from an ``EntityKey`` protobuf; for the scalar key
    types here the bytes are a constant prefix (the sorted key names) followed by each value's
    type, length and bytes. :meth:`verified` compares with Feast's own function, so a change in
    Feast's format turns the fast path off instead of reading wrong keys.
    """

    _PACK = {"INT64": ("<q", 4), "INT32": ("<i", 3)}

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
        return self._prefix + b"".join(pack(key[i]) for pack, i in zip(self._packers, self._order))

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
                    _value_proto(Value, k.proto_field, v) for k, v in zip(join_keys, key)
                ],
            )
            if serializer(key) != serialize_entity_key(
                proto, entity_key_serialization_version=version
            ):
                return None
        return serializer


class LockBusy(Exception):
    """A no-wait read met a writer's lock (a materialization or push committing)."""


class SqliteRows:
    """Reads Feast's SQLite online tables directly, on read-only connections of its own.

    Same table, same rows and same query as ``SqliteOnlineStore.online_read``, minus its
    per-row costs: no protobuf entity keys, no timestamp conversion inside sqlite3, and only the
    requested features when few are wanted.

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

    def fetch(
        self, queries: list[tuple[str, list[bytes], tuple[str, ...] | None]], wait: bool = True
    ) -> list[list[tuple[bytes, str, bytes, int]]]:
        """For each (table, serialized keys, features or None for all), the rows.

        Raises:
            LockBusy: ``wait`` is False and a writer holds the database.
            FailedPrecondition: a view's online table is missing.
        """
        conn = self._connection(wait)
        out = []
        for table, keys, features in queries:
            sql = f"SELECT entity_key, feature_name, value, event_ts FROM {_quote(table)} WHERE entity_key IN ({','.join('?' * len(keys))})"
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


RunBlocking = Callable[..., Awaitable[Any]]


def _value_proto(value_class: Any, field_name: str, value: Any) -> Any:
    """A Feast ``ValueProto`` with one field set."""
    kwargs: dict[str, Any] = {field_name: value}
    return value_class(**kwargs)


class OnlineReader:
    """Reads online features for a plan.

    Three ways, chosen once from the online store's type: Feast's SQLite tables directly (the
    query in a worker thread, conversions on the caller's loop); ``online_read_async`` for stores
    with an async client (Redis); ``online_read`` in a worker thread for the rest.

    Args:
        store: the Feast feature store.
        run_blocking: runs a blocking callable off the event loop and awaits it.
        inline_max_keys: SQLite reads of at most this many distinct entity keys run on the
            caller's loop, without waiting for locks (0: every read in a worker thread).
    """

    def __init__(
        self, store: feast.FeatureStore, run_blocking: RunBlocking, *, inline_max_keys: int = 0
    ) -> None:
        from feast.infra.online_stores.sqlite import SqliteOnlineStore
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self._store = store
        self._run = run_blocking
        self._inline_max_keys = inline_max_keys
        self._entity_key = EntityKey
        self._value = Value
        self._online_store = store._get_provider().online_store
        self._config = store.config
        self._versioned = bool(
            getattr(store.config.registry, "enable_online_feature_view_versioning", False)
        )
        self._sqlite = (
            SqliteRows(SqliteOnlineStore._get_db_path(store.config))
            if isinstance(self._online_store, SqliteOnlineStore)
            else None
        )
        self._async = self._sqlite is None and bool(self._online_store.async_supported.read)
        self._serializers: dict[tuple[JoinKey, ...], KeySerializer | None] = {}
        self._times: dict[int, datetime] = {}

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Raises InvalidArgument for an empty or oversized request."""
        if not rows:
            raise InvalidArgument("entity_rows", "at least one entity row is required")
        if len(rows) > MAX_ENTITY_ROWS:
            raise InvalidArgument(
                "entity_rows", f"{len(rows)} rows, at most {MAX_ENTITY_ROWS} per request"
            )

    async def read(self, plan: OnlinePlan, rows: Sequence[Mapping[str, Any]]) -> list[OnlineColumn]:
        """The plan's columns for ``rows``.

        Raises:
            InvalidArgument: empty or oversized request, or a missing or mistyped join key,
                naming ``entity_rows[i].<join key>``.
        """
        self.check_rows(rows)
        if plan.fallback:
            return await self._run(self._read_with_feast, plan, rows)
        keyed = self.prepare(plan, rows)
        if self._sqlite is not None:
            serializers = [self._serializer(k.read.join_keys) for k in keyed]
            if all(s is not None for s in serializers):
                return await self._read_sqlite(plan, keyed, serializers)  # type: ignore[arg-type]
        if self._async:
            results = [
                await self._online_store.online_read_async(**self._read_args(k)) for k in keyed
            ]
        else:
            results = await self._run(self._read_sync, keyed)
        return self._assemble(plan, keyed, results)

    def prepare(self, plan: OnlinePlan, rows: Sequence[Mapping[str, Any]]) -> list[_KeyedRead]:
        """Checks and converts the join keys of every row; one entry per distinct key and view."""
        converted: dict[str, list[Any]] = {}
        for name, key in plan.join_keys.items():
            convert = key.convert
            fast_int = key.type_name == "INT64"
            values: list[Any] = []
            append = values.append
            for i, row in enumerate(rows):
                value = row.get(name, _MISSING)
                # Struct numbers are doubles: an integral one is the common case, checked inline.
                if (
                    fast_int
                    and type(value) is float
                    and value.is_integer()
                    and -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT
                ):
                    append(int(value))
                elif value is _MISSING:
                    raise InvalidArgument(
                        f"entity_rows[{i}].{name}", f"join key {name!r} is missing"
                    )
                else:
                    append(convert(value, f"entity_rows[{i}].{name}"))
            converted[name] = values

        keyed: list[_KeyedRead] = []
        for read in plan.reads:
            columns = [converted[k.name] for k in read.join_keys]
            distinct: dict[tuple[Any, ...], int] = {}
            if len(columns) == 1:
                positions = [distinct.setdefault((v,), len(distinct)) for v in columns[0]]
            else:
                positions = [distinct.setdefault(t, len(distinct)) for t in zip(*columns)]
            keyed.append(_KeyedRead(read=read, keys=list(distinct), positions=positions))
        return keyed

    def _serializer(self, join_keys: tuple[JoinKey, ...]) -> KeySerializer | None:
        if join_keys not in self._serializers:
            self._serializers[join_keys] = KeySerializer.verified(
                join_keys, self._config.entity_key_serialization_version
            )
        return self._serializers[join_keys]

    async def _read_sqlite(
        self, plan: OnlinePlan, keyed: list[_KeyedRead], serializers: list[KeySerializer]
    ) -> list[OnlineColumn]:
        from feast.infra.online_stores.helpers import compute_table_id

        project = self._config.project
        queries = []
        serialized_keys: list[list[bytes]] = []
        for k, serialize in zip(keyed, serializers):
            keys = [serialize(key) for key in k.keys]
            serialized_keys.append(keys)
            # Filtering by feature name costs more than it saves unless few of the view's
            # features are wanted (measured: 3 of 3 features, 100 keys: 0.47 vs 0.30 ms).
            wanted = (
                k.read.features if 2 * len(k.read.features) <= len(k.read.view.features) else None
            )
            queries.append((compute_table_id(project, k.read.view, self._versioned), keys, wanted))
        fetched = None
        if sum(len(keys) for keys in serialized_keys) <= self._inline_max_keys:
            # Small reads run on the loop: a few index lookups in a file the page cache holds,
            # cheaper than the two thread handoffs (and their scheduling delays on a busy
            # machine) that a worker thread costs. They never wait for a lock: when a writer
            # is committing, the read goes to a worker thread like a large one.
            try:
                fetched = self._sqlite.fetch(queries, wait=False)  # type: ignore[union-attr]
            except LockBusy:
                fetched = None
        if fetched is None:
            fetched = await self._run(self._sqlite.fetch, queries)  # type: ignore[union-attr]

        decode, times = self._value.FromString, self._times
        columns: list[OnlineColumn | None] = [None] * len(plan.refs)
        for k, keys, rows in zip(keyed, serialized_keys, fetched):
            index = {key: i for i, key in enumerate(keys)}
            width = len(keys)
            per_feature: dict[str, tuple[list[Any], list[int], list[datetime | None]]] = {
                f: ([None] * width, [_NOT_FOUND] * width, [None] * width) for f in k.read.features
            }
            for entity_key, feature, blob, stamp in rows:
                slot = index[entity_key]
                wanted_lists = per_feature.get(feature)
                if wanted_lists is None:
                    continue
                values, statuses, stamps = wanted_lists
                stored = decode(blob)
                kind = stored.WhichOneof("val")
                values[slot] = (
                    getattr(stored, kind) if kind in _SCALAR_KINDS else python_value(stored)
                )
                statuses[slot] = _PRESENT
                moment = times.get(stamp)
                if moment is None:
                    moment = times[stamp] = _feast_sqlite_time(stamp)
                    if len(times) > 100_000:
                        times.clear()
                        times[stamp] = moment
                stamps[slot] = moment
            for feature, column in zip(k.read.features, k.read.columns):
                values, statuses, stamps = per_feature[feature]
                columns[column] = _fan_out(plan.refs[column], values, statuses, stamps, k.positions)
        return [c for c in columns if c is not None]

    def _read_args(self, k: _KeyedRead) -> dict[str, Any]:
        EntityKey, Value = self._entity_key, self._value
        names = [j.name for j in k.read.join_keys]
        fields = [j.proto_field for j in k.read.join_keys]
        entity_keys = [
            EntityKey(
                join_keys=names,
                entity_values=[_value_proto(Value, f, v) for f, v in zip(fields, key)],
            )
            for key in k.keys
        ]
        return {
            "config": self._config,
            "table": k.read.view,
            "entity_keys": entity_keys,
            "requested_features": list(k.read.features),
        }

    def _read_sync(self, keyed: list[_KeyedRead]) -> list[list[tuple[Any, Any]]]:
        return [self._online_store.online_read(**self._read_args(k)) for k in keyed]

    @staticmethod
    def _assemble(
        plan: OnlinePlan, keyed: list[_KeyedRead], results: list[list[tuple[Any, Any]]]
    ) -> list[OnlineColumn]:
        """Turns ``online_read`` rows into one column per requested reference, in request order."""
        columns: list[OnlineColumn | None] = [None] * len(plan.refs)
        for k, rows in zip(keyed, results):
            for feature, column in zip(k.read.features, k.read.columns):
                values: list[Any] = []
                statuses: list[int] = []
                stamps: list[datetime | None] = []
                for event_time, data in rows:
                    stored = data.get(feature) if data is not None else None
                    # Feast's Redis store answers a key it does not hold with empty values at
                    # epoch 0 (and calls them PRESENT); report them as the SQLite store does.
                    if stored is None or (
                        event_time == _EPOCH and stored.WhichOneof("val") is None
                    ):
                        values.append(None)
                        statuses.append(_NOT_FOUND)
                        stamps.append(None)
                    else:
                        values.append(python_value(stored))
                        statuses.append(_PRESENT)
                        stamps.append(event_time)
                columns[column] = _fan_out(plan.refs[column], values, statuses, stamps, k.positions)
        return [c for c in columns if c is not None]

    def _read_with_feast(
        self, plan: OnlinePlan, rows: Sequence[Mapping[str, Any]]
    ) -> list[OnlineColumn]:
        """Blocking: serves the request through ``FeatureStore.get_online_features``."""
        entity_rows = [{k: _integral(v) for k, v in row.items()} for row in rows]
        try:
            response = self._store.get_online_features(
                list(plan.refs), entity_rows, full_feature_names=True
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidArgument("entity_rows", f"Feast refused the entity rows: {exc}") from None
        proto = response.proto
        index = {name: i for i, name in enumerate(proto.metadata.feature_names.val)}
        columns: list[OnlineColumn] = []
        for ref in plan.refs:
            view, _, feature = ref.partition(":")
            vector = proto.results[index[f"{view}__{feature}"]]
            stamps = [
                ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None
                for ts in vector.event_timestamps
            ]
            statuses = [_FROM_FEAST_STATUS.get(s, 0) for s in vector.statuses]
            columns.append(
                OnlineColumn(ref, [python_value(v) for v in vector.values], statuses, stamps)
            )
        return columns


_PRESENT, _NOT_FOUND = int(FieldStatus.PRESENT), int(FieldStatus.NOT_FOUND)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _feast_sqlite_time(stamp: Any) -> datetime:
    """An ``event_ts`` cell as Feast's SQLite store returns it (its converter, then UTC)."""
    if isinstance(stamp, bytes):
        stamp = int(stamp)
    if isinstance(stamp, str):
        parsed = datetime.fromisoformat(stamp)
        return (
            parsed.astimezone(UTC)
            if parsed.tzinfo
            else parsed.replace(tzinfo=UTC)
        )
    return datetime.fromtimestamp(int(stamp)).replace(tzinfo=UTC)


def _fan_out(
    name: str, values: list[Any], statuses: list[int], stamps: list[Any], positions: list[int]
) -> OnlineColumn:
    """Per-distinct-key lists -> per-request-row lists (cheap when every key is distinct)."""
    if len(positions) == len(values):
        return OnlineColumn(name, values, statuses, stamps)
    return OnlineColumn(
        name,
        [values[p] for p in positions],
        [statuses[p] for p in positions],
        [stamps[p] for p in positions],
    )


def _integral(value: Any) -> Any:
    if (
        type(value) is float
        and value.is_integer()
        and not math.isinf(value)
        and abs(value) <= _MAX_EXACT_INT
    ):
        return int(value)
    return value
