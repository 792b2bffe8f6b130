"""Online feature reads on Feast's online stores, with the per-request work cut to the bone.

``FeatureStore.get_online_features`` resolves references, converts every entity value to a
protobuf, sorts and groups rows, builds a response protobuf and then converts it again. Here:

- a request's feature references resolve once into an :class:`OnlinePlan` (cached);
- entity values are checked and converted once per distinct key;
- on Feast's SQLite online store, the rows are read from Feast's own tables
  (:mod:`services.features.sqlite_online_reader`);
- on stores with an async client (Redis), Feast's ``online_read_async``; on others, Feast's
  ``online_read`` in a worker thread.

So values, statuses and event timestamps are Feast's own. References the fast path does not
cover (on-demand views, projected join keys, versioned references, entityless views, other key
types) are served by ``FeatureStore.get_online_features`` itself, in a worker thread.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.features.domain import (
    MAX_ENTITY_ROWS,
    FieldStatus,
    OnlineColumn,
    parse_feature_refs,
)
from services.features.feast_values import (
    MAX_EXACT_INT,
    JoinKey,
    join_key,
    python_value,
    value_proto,
)
from services.features.sqlite_online_reader import (
    KeySerializer,
    SqliteOnlineReader,
    ViewQuery,
)

if TYPE_CHECKING:
    import feast

__all__ = ["OnlinePlan", "OnlinePlanner", "OnlineReader"]

_MISSING = object()
RunBlocking = Callable[..., Awaitable[Any]]


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
            keys = [join_key(c.name, c.dtype.to_value_type()) for c in view.entity_columns]
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


@dataclass(slots=True)
class _KeyedRead:
    """The distinct entity keys of one view read, and where each request row points."""

    read: ViewRead
    keys: list[tuple[Any, ...]]
    positions: list[int]


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
        self._entity_key = EntityKey
        self._value = Value
        self._online_store = store._get_provider().online_store
        self._config = store.config
        self._versioned = bool(
            getattr(store.config.registry, "enable_online_feature_view_versioning", False)
        )
        self._sqlite = (
            SqliteOnlineReader(
                SqliteOnlineStore._get_db_path(store.config),
                run_blocking,
                inline_max_keys=inline_max_keys,
            )
            if isinstance(self._online_store, SqliteOnlineStore)
            else None
        )
        self._async = self._sqlite is None and bool(self._online_store.async_supported.read)
        self._serializers: dict[tuple[JoinKey, ...], KeySerializer | None] = {}

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
                    and -MAX_EXACT_INT <= value <= MAX_EXACT_INT
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
                positions = [
                    distinct.setdefault(t, len(distinct)) for t in zip(*columns, strict=True)
                ]
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
        for k, serialize in zip(keyed, serializers, strict=True):
            # Filtering by feature name costs more than it saves unless few of the view's
            # features are wanted (measured: 3 of 3 features, 100 keys: 0.47 vs 0.30 ms).
            queries.append(
                ViewQuery(
                    table=compute_table_id(project, k.read.view, self._versioned),
                    keys=[serialize(key) for key in k.keys],
                    features=k.read.features,
                    filter_features=2 * len(k.read.features) <= len(k.read.view.features),
                )
            )
        fetched = await self._sqlite.read(queries)  # type: ignore[union-attr]
        columns: list[OnlineColumn | None] = [None] * len(plan.refs)
        for k, per_feature in zip(keyed, fetched, strict=True):
            for feature, column in zip(k.read.features, k.read.columns, strict=True):
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
                entity_values=[value_proto(Value, f, v) for f, v in zip(fields, key, strict=True)],
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
        for k, rows in zip(keyed, results, strict=True):
            for feature, column in zip(k.read.features, k.read.columns, strict=True):
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
        and abs(value) <= MAX_EXACT_INT
    ):
        return int(value)
    return value
