"""The features service's domain logic on Feast: apply, list, materialize, online, push, offline.

Imports neither grpc nor nats. Every Feast call blocks, so each runs in a worker thread: online
reads and pushes in a pool of their own, so that a long materialization or historical query
never queues a serving read behind it. Registry changes (apply, materialize) run one at a time.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from plinth_common.db import Database
from plinth_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PlinthError,
    Unavailable,
)
from services.features.feast_engine import FeastEngine
from services.features.online import OnlineColumn, OnlinePlanner, OnlineReader, parse_feature_refs
from services.features.repository import (
    Limits,
    RepositoryFolder,
    load_repo_contents,
    validate_files,
)
from services.features.tables import (
    TableFormat,
    check_entity_frame,
    decode_table,
    detect_format,
    encode_table,
)

if TYPE_CHECKING:
    import feast
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)
T = TypeVar("T")

ENTITY_TIMESTAMP_COLUMN = "event_timestamp"
_ROW_ORDER_COLUMN = "__plinth_row"
MAX_PUSH_ROWS = 10_000


@dataclass(frozen=True, kw_only=True)
class ApplyResult:
    """What the repository holds after an apply (names), and what the apply deleted."""

    entities: tuple[str, ...]
    feature_views: tuple[str, ...]
    on_demand_feature_views: tuple[str, ...]
    feature_services: tuple[str, ...]
    data_sources: tuple[str, ...]
    deleted: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class FeatureViewInfo:
    """A feature view as listed."""

    name: str
    entities: tuple[str, ...]
    features: tuple[str, ...]
    join_keys: tuple[str, ...]
    ttl_seconds: float
    online: bool
    batch_source: str
    push_source: str
    tags: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class Materialization:
    """A completed materialization run."""

    feature_views: tuple[str, ...]
    start_time: datetime | None
    end_time: datetime
    duration_seconds: float


@dataclass(frozen=True, kw_only=True)
class HistoricalResult:
    """A point-in-time correct feature table, encoded."""

    table: bytes
    format: TableFormat
    rows: int


class FeatureEvents(Protocol):
    """Publishes the service's events inside the caller's transaction."""

    async def materialized(self, session: AsyncSession, run: Materialization) -> None: ...


class FeaturesService:
    """Entities, feature views, materialization and retrieval on one Feast repository.

    Args:
        engine: the Feast engine (its store is used once started).
        db: the service's database (for the outbox).
        events: the event publisher.
        limits: bounds on ``ApplyRepository`` uploads.
        read_workers: threads serving online reads and pushes.
        batch_workers: threads running applies, materializations and historical retrievals.
        plan_ttl_s: how long resolved feature references are cached.
        inline_read_max_keys: SQLite online reads of at most this many entity keys run on the
            event loop, never waiting for a lock (0: all in worker threads).
    """

    def __init__(
        self,
        *,
        engine: FeastEngine,
        db: Database,
        events: FeatureEvents,
        limits: Limits = Limits(),
        read_workers: int = 2,
        batch_workers: int = 2,
        plan_ttl_s: float = 10.0,
        inline_read_max_keys: int = 0,
    ) -> None:
        self._engine = engine
        self._db = db
        self._events = events
        self._limits = limits
        self._folder = RepositoryFolder(engine.settings.repo_path)
        self._reads = ThreadPoolExecutor(max_workers=read_workers, thread_name_prefix="feast-read")
        self._batch = ThreadPoolExecutor(
            max_workers=batch_workers, thread_name_prefix="feast-batch"
        )
        self._plan_ttl_s = plan_ttl_s
        self._inline_read_max_keys = inline_read_max_keys
        self._registry_writes = asyncio.Lock()
        self._online: tuple[Any, OnlinePlanner, OnlineReader] | None = None

    async def stop(self) -> None:
        """Waits for running Feast calls and releases the worker threads."""
        await asyncio.to_thread(self._reads.shutdown, wait=True)
        await asyncio.to_thread(self._batch.shutdown, wait=True)

    # --- helpers ------------------------------------------------------------------------------

    def _store(self) -> feast.FeatureStore:
        try:
            return self._engine.store
        except RuntimeError:
            raise Unavailable("the Feast feature store is starting; retry shortly") from None

    def _online_parts(self) -> tuple[OnlinePlanner, OnlineReader]:
        store = self._store()
        parts = self._online
        if parts is None or parts[0] is not store:
            parts = (
                store,
                OnlinePlanner(store, ttl_s=self._plan_ttl_s),
                OnlineReader(
                    store, self._read_blocking, inline_max_keys=self._inline_read_max_keys
                ),
            )
            self._online = parts
        return parts[1], parts[2]

    async def _read_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        # The serving path: no context copy, a pool of its own.
        return await asyncio.get_running_loop().run_in_executor(self._reads, fn, *args)

    async def _in(self, executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        # The trace context follows the call into the worker thread.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(executor, context.run, fn)

    # --- repository ---------------------------------------------------------------------------

    async def apply_repository(self, files: Mapping[str, bytes]) -> ApplyResult:
        """Replaces the repository's definition files and applies them (``feast apply``).

        Raises:
            InvalidArgument: a path, size or name is refused, or a file fails to load, naming it;
                or Feast refuses the definitions.
        """
        definitions = validate_files(files, self._limits)
        store = self._store()
        async with self._registry_writes:
            staging = await self._in(self._batch, lambda: self._folder.stage(definitions))
            try:
                result = await self._in(self._batch, lambda: self._apply(store, staging))
            except BaseException:
                await self._in(self._batch, lambda: self._folder.discard(staging))
                raise
            await self._in(self._batch, lambda: self._folder.promote(staging))
            if self._online is not None:
                self._online[1].invalidate()
        log.info(
            "applied %d feature views, deleted %s",
            len(result.feature_views),
            list(result.deleted) or "nothing",
        )
        return result

    def _apply(self, store: feast.FeatureStore, staging: Any) -> ApplyResult:
        from feast.repo_operations import (
            apply_total_with_repo_instance,
            extract_objects_for_apply_delete,
        )

        contents = load_repo_contents(staging, project=store.project)
        registry = store.registry
        _, to_delete, _, _ = extract_objects_for_apply_delete(store.project, registry, contents)
        try:
            apply_total_with_repo_instance(
                store, store.project, registry, contents, skip_source_validation=False
            )
        except PlinthError:
            raise
        except Exception as exc:  # noqa: BLE001 - Feast validates user definitions with many types
            raise InvalidArgument(
                "files", f"Feast refused the definitions: {type(exc).__name__}: {exc}"
            ) from None
        views = [*contents.feature_views, *contents.stream_feature_views]
        return ApplyResult(
            entities=tuple(e.name for e in contents.entities if not e.name.startswith("__")),
            feature_views=tuple(v.name for v in views),
            on_demand_feature_views=tuple(v.name for v in contents.on_demand_feature_views),
            feature_services=tuple(s.name for s in contents.feature_services),
            data_sources=tuple(s.name for s in contents.data_sources if s.name),
            deleted=tuple(
                f"{type(o).__name__}:{o.name}" for o in to_delete if not o.name.startswith("__")
            ),
        )

    async def list_feature_views(self) -> list[FeatureViewInfo]:
        """Every feature view of the project (batch, stream and push-fed)."""
        store = self._store()

        def listing() -> list[FeatureViewInfo]:
            views = [
                *store.list_feature_views(allow_cache=True),
                *store.list_stream_feature_views(allow_cache=True),
            ]
            return [_view_info(v) for v in sorted(views, key=lambda v: v.name)]

        return await self._in(self._batch, listing)

    # --- materialization ----------------------------------------------------------------------

    async def materialize(
        self, views: Sequence[str], start: datetime | None, end: datetime | None
    ) -> Materialization:
        """Loads ``[start, end)`` from the offline store into the online store.

        Raises:
            InvalidArgument: a missing or inverted window.
            NotFound: an unknown feature view.
        """
        if start is None:
            raise InvalidArgument("start_time", "required")
        if end is None:
            raise InvalidArgument("end_time", "required")
        if start >= end:
            raise InvalidArgument("start_time", "must be before end_time")
        store = self._store()

        def run() -> tuple[str, ...]:
            names = _views_to_materialize(store, views)
            store.materialize(start, end, feature_views=list(names))
            return names

        return await self._materialization(run, start, end, incremental=False)

    async def materialize_incremental(
        self, views: Sequence[str], end: datetime | None
    ) -> Materialization:
        """Loads what arrived since each view's last materialization (or its TTL) up to ``end``.

        Raises:
            InvalidArgument: a missing end time.
            NotFound: an unknown feature view.
            FailedPrecondition: a view with neither a TTL nor an earlier materialization.
        """
        if end is None:
            raise InvalidArgument("end_time", "required")
        store = self._store()
        started: list[datetime] = []

        def run() -> tuple[str, ...]:
            names = _views_to_materialize(store, views)
            started.extend(_incremental_starts(store, names, end))
            store.materialize_incremental(end, feature_views=list(names))
            return names

        run_result = await self._materialization(run, None, end, incremental=True, starts=started)
        return run_result

    async def _materialization(
        self,
        run: Callable[[], tuple[str, ...]],
        start: datetime | None,
        end: datetime,
        *,
        incremental: bool,
        starts: list[datetime] | None = None,
    ) -> Materialization:
        async with self._registry_writes:
            began = time.monotonic()
            try:
                names = await self._in(self._batch, run)
            except PlinthError:
                raise
            except Exception as exc:  # noqa: BLE001 - offline store and registry errors
                raise FailedPrecondition(
                    f"materialization failed: {type(exc).__name__}: {exc}"
                ) from None
            duration = time.monotonic() - began
        if incremental and starts:
            start = min(starts)
        result = Materialization(
            feature_views=names, start_time=start, end_time=end, duration_seconds=duration
        )
        async with self._db.transaction() as session:
            await self._events.materialized(session, result)
        log.info("materialized %s in %.3f s", list(names), duration)
        return result

    # --- online -------------------------------------------------------------------------------

    async def get_online_features(
        self, refs: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> list[OnlineColumn]:
        """Latest values of ``refs`` for each entity row, with statuses and event timestamps.

        Args:
            refs: ``view:feature`` references.
            rows: join key -> value, one mapping per entity (JSON-like values: numbers may be
                floats, as in a protobuf Struct).

        Returns:
            One column per reference, in request order; a key absent from the online store
            gives NOT_FOUND values, not an error.

        Raises:
            InvalidArgument: malformed references, or a missing or mistyped join key (named).
            NotFound: an unknown feature view or feature (named).
        """
        planner, reader = self._online_parts()
        return await reader.read(planner.plan(refs), rows)

    async def push(
        self, push_source: str, rows: Sequence[Mapping[str, Any]], *, to_offline: bool
    ) -> int:
        """Writes rows through a push source to the views it feeds (and the offline store).

        Raises:
            InvalidArgument: no rows, or a missing, unknown or mistyped column (named).
            NotFound: an unknown push source.
        """
        if not push_source:
            raise InvalidArgument("push_source", "required")
        if not rows:
            raise InvalidArgument("rows", "at least one row is required")
        if len(rows) > MAX_PUSH_ROWS:
            raise InvalidArgument("rows", f"{len(rows)} rows, at most {MAX_PUSH_ROWS} per request")
        store = self._store()

        def write() -> int:
            from feast.data_source import PushMode

            frame = _push_frame(store, push_source, rows)
            try:
                store.push(
                    push_source,
                    frame,
                    to=PushMode.ONLINE_AND_OFFLINE if to_offline else PushMode.ONLINE,
                )
            except Exception as exc:  # noqa: BLE001 - Feast's conversion and store errors
                raise FailedPrecondition(
                    f"push to {push_source!r} failed: {type(exc).__name__}: {exc}"
                ) from None
            return len(frame)

        return await self._in(self._reads if not to_offline else self._batch, write)

    # --- offline ------------------------------------------------------------------------------

    async def get_historical_features(
        self,
        refs: Sequence[str],
        entity_table: bytes,
        table_format: TableFormat | None,
        *,
        full_feature_names: bool,
    ) -> HistoricalResult:
        """Point-in-time correct features for each row of an entity table.

        Each row gets, per feature view, the latest feature row at or before its
        ``event_timestamp`` and within the view's TTL (null when there is none). The result keeps
        the entity table's columns and row order and adds one column per feature.

        Raises:
            InvalidArgument: malformed references or entity table (naming the column).
            NotFound: an unknown feature view or feature (named).
        """
        parsed = parse_feature_refs(refs)
        fmt = table_format or detect_format(entity_table)
        store = self._store()

        def retrieve() -> HistoricalResult:
            join_keys = _join_keys_of(store, parsed)
            table = decode_table(entity_table, fmt)
            frame = table.to_pandas()
            check_entity_frame(frame, join_keys, timestamp_column=ENTITY_TIMESTAMP_COLUMN)
            result = _point_in_time_join(
                store, table, frame, list(join_keys), list(refs), full_feature_names
            )
            return HistoricalResult(
                table=encode_table(result, fmt), format=fmt, rows=result.num_rows
            )

        return await self._in(self._batch, retrieve)


# --- Feast helpers (run in worker threads) ---------------------------------------------------------


def _view_info(view: Any) -> FeatureViewInfo:
    from feast.data_source import PushSource

    stream = getattr(view, "stream_source", None)
    batch = getattr(view, "batch_source", None)
    return FeatureViewInfo(
        name=view.name,
        entities=tuple(e for e in view.entities if not e.startswith("__")),
        features=tuple(f.name for f in view.features),
        join_keys=tuple(c.name for c in view.entity_columns),
        ttl_seconds=view.ttl.total_seconds() if view.ttl else 0.0,
        online=bool(view.online),
        batch_source=batch.name if batch is not None else "",
        push_source=stream.name if isinstance(stream, PushSource) else "",
        tags=dict(view.tags),
    )


def _views_to_materialize(store: feast.FeatureStore, names: Sequence[str]) -> tuple[str, ...]:
    from feast.errors import FeatureViewNotFoundException

    try:
        # Feast's own choice of views (all online, enabled ones when none are named).
        views = store._get_feature_views_to_materialize(list(names) or None)
    except FeatureViewNotFoundException as exc:
        missing = next((n for n in names if not _has_view(store, n)), str(exc))
        raise NotFound("feature view", missing) from None
    except ValueError as exc:
        raise FailedPrecondition(str(exc)) from None
    return tuple(v.name for v in views)


def _has_view(store: feast.FeatureStore, name: str) -> bool:
    from feast.errors import FeatureViewNotFoundException

    try:
        store.registry.get_any_feature_view(name, store.project, allow_cache=True)
    except FeatureViewNotFoundException:
        return False
    return True


def _incremental_starts(
    store: feast.FeatureStore, names: Sequence[str], end: datetime
) -> list[datetime]:
    """Where ``materialize_incremental`` starts each view (Feast's rule), for the event."""
    from feast import FeatureView

    starts: list[datetime] = []
    now = datetime.now(UTC)
    for name in names:
        view = store.registry.get_any_feature_view(name, store.project, allow_cache=True)
        if not isinstance(view, FeatureView):
            continue
        if view.most_recent_end_time is not None:
            start = view.most_recent_end_time
        elif view.ttl is None:
            raise FailedPrecondition(
                f"feature view {name!r} has no TTL and was never materialized: run Materialize first"
            )
        elif view.ttl.total_seconds() > 0:
            start = now - view.ttl
        else:
            start = now - timedelta(weeks=52)
        starts.append(start if start.tzinfo else start.replace(tzinfo=UTC))
    return starts


def _join_keys_of(store: feast.FeatureStore, parsed: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Join key -> ValueType of the referenced views; NotFound for unknown views or features."""
    from feast import FeatureView
    from feast.errors import FeatureViewNotFoundException

    keys: dict[str, Any] = {}
    for view_name, feature in parsed:
        try:
            view = store.registry.get_any_feature_view(
                view_name.split("@")[0], store.project, allow_cache=True
            )
        except FeatureViewNotFoundException:
            raise NotFound("feature view", view_name) from None
        if feature not in {f.name for f in view.features}:
            raise NotFound("feature", f"{view_name}:{feature}")
        if isinstance(view, FeatureView):
            for column in view.entity_columns:
                keys[view.projection.join_key_map.get(column.name, column.name)] = (
                    column.dtype.to_value_type()
                )
    return keys


def _point_in_time_join(
    store: feast.FeatureStore,
    table: pa.Table,
    frame: pd.DataFrame,
    join_keys: list[str],
    refs: list[str],
    full_feature_names: bool,
) -> pa.Table:
    """Feast's historical retrieval, made total: every entity row comes back, in order.

    Feast's file offline store drops an entity row that has no feature row inside its window
    and collapses repeated (keys, timestamp) rows; so Feast gets the distinct (keys, timestamp)
    rows and its answer is left-joined back onto the entity table: a row without a match gets
    nulls, as point-in-time semantics require.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    on = [*join_keys, ENTITY_TIMESTAMP_COLUMN]
    if _ROW_ORDER_COLUMN in frame.columns:
        raise InvalidArgument(f"entity_table.{_ROW_ORDER_COLUMN}", "reserved column name")
    utc = pd.to_datetime(frame[ENTITY_TIMESTAMP_COLUMN], utc=True)
    frame = frame.assign(**{ENTITY_TIMESTAMP_COLUMN: utc})
    distinct = frame.drop_duplicates(subset=on, ignore_index=True)
    try:
        job = store.get_historical_features(
            entity_df=distinct, features=refs, full_feature_names=full_feature_names
        )
        found = job.to_arrow()
    except PlinthError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline store errors
        raise FailedPrecondition(
            f"historical retrieval failed: {type(exc).__name__}: {exc}"
        ) from None
    added = [c for c in found.column_names if c not in distinct.columns]
    for name in added:
        if name in table.column_names:
            raise InvalidArgument(
                f"entity_table.{name}", "collides with a requested feature's column; rename it"
            )
    left = pa.Table.from_pandas(frame[on], preserve_index=False)
    left = left.append_column(_ROW_ORDER_COLUMN, pa.array(range(len(frame)), pa.int64()))
    right = found.select([*on, *added])
    for i, name in enumerate(on):  # Feast may widen keys and timestamps; join on the caller's types
        right = right.set_column(i, name, pc.cast(right.column(name), left.schema.field(name).type))
    joined = left.join(right, keys=on, join_type="left outer").sort_by(_ROW_ORDER_COLUMN)
    result = table
    for name in added:
        result = result.append_column(joined.schema.field(name), joined.column(name))
    return result


def _push_frame(
    store: feast.FeatureStore, push_source: str, rows: Sequence[Mapping[str, Any]]
) -> pd.DataFrame:
    """The rows as a DataFrame typed by the schemas of the views the push source feeds."""
    import pandas as pd
    from feast.data_source import PushSource
    from feast.errors import DataSourceObjectNotFoundException

    try:
        source = store.get_data_source(push_source)
    except DataSourceObjectNotFoundException:
        raise NotFound("push source", push_source) from None
    if not isinstance(source, PushSource):
        raise InvalidArgument(
            "push_source", f"{push_source!r} is a {type(source).__name__}, not a push source"
        )
    views = [
        v
        for v in store.list_feature_views(allow_cache=True)
        if v.stream_source is not None and v.stream_source.name == push_source
    ]
    if not views:
        raise FailedPrecondition(f"push source {push_source!r} feeds no feature view")
    columns: dict[str, Any] = {}
    for view in views:
        for f in [*view.entity_columns, *view.features]:
            columns.setdefault(f.name, f.dtype.to_value_type())
    batch = source.batch_source
    timestamp_field = (
        batch.timestamp_field
        if batch is not None and batch.timestamp_field
        else ENTITY_TIMESTAMP_COLUMN
    )
    created_field = batch.created_timestamp_column if batch is not None else ""
    join_keys = {c.name for v in views for c in v.entity_columns}

    now = datetime.now(UTC)
    data: dict[str, list[Any]] = {name: [] for name in columns}
    stamps: list[datetime] = []
    for i, row in enumerate(rows):
        for key in row:
            if key not in columns and key != timestamp_field:
                raise InvalidArgument(
                    f"rows[{i}].{key}", f"not a column of the views {push_source!r} feeds"
                )
        for name, value_type in columns.items():
            where = f"rows[{i}].{name}"
            value = row.get(name)
            if value is None and name in join_keys:
                raise InvalidArgument(where, f"join key {name!r} is missing")
            data[name].append(_typed(value, value_type, where))
        stamps.append(_timestamp(row.get(timestamp_field), now, f"rows[{i}].{timestamp_field}"))
    frame = pd.DataFrame(
        {
            name: pd.array(values, dtype=_PANDAS_DTYPES.get(columns[name].name, object))
            for name, values in data.items()
        }
    )
    frame[timestamp_field] = pd.to_datetime(stamps, utc=True)
    if created_field:
        frame[created_field] = pd.Timestamp(now)
    return frame


_PANDAS_DTYPES = {
    "INT64": "Int64",
    "INT32": "Int32",
    "FLOAT": "Float32",
    "DOUBLE": "Float64",
    "BOOL": "boolean",
    "STRING": object,
}


def _typed(value: Any, value_type: Any, where: str) -> Any:
    if value is None:
        return None
    kind = value_type.name
    if kind in ("INT64", "INT32"):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InvalidArgument(where, f"expected an integer, got {type(value).__name__} {value!r}")
    if kind in ("FLOAT", "DOUBLE"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InvalidArgument(where, f"expected a number, got {type(value).__name__} {value!r}")
    if kind == "STRING":
        if isinstance(value, str):
            return value
        raise InvalidArgument(where, f"expected a string, got {type(value).__name__}")
    if kind == "BOOL":
        if isinstance(value, bool):
            return value
        raise InvalidArgument(where, f"expected a boolean, got {type(value).__name__}")
    raise InvalidArgument(where, f"pushing {kind} values is not supported")


def _timestamp(value: Any, default: datetime, where: str) -> datetime:
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), tz=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(where, f"not an RFC 3339 timestamp: {value!r}") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise InvalidArgument(
        where, f"expected an RFC 3339 string or epoch seconds, got {type(value).__name__}"
    )
