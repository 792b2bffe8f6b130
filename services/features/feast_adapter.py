"""The features service's engine adapter: everything that knows Feast, pandas and pyarrow.

:class:`FeastAdapter` implements :class:`services.features.service.FeatureEngine` on one Feast
repository (built by :class:`~services.features.feast_engine.FeastEngine`): staging and applying
definition files, listing views, materialization, online reads, pushes and point-in-time joins.

Every Feast call blocks, so each runs in a worker thread of the executors the wiring passes in:
online reads and pushes in one of their own, so that a long materialization or historical query
never queues a serving read behind it. Feast's known failures become domain errors
(:mod:`services.features.feast_errors`); the rest propagate. Feast is imported in those worker
threads, never at module import.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.features.domain import (
    ENTITY_TIMESTAMP_COLUMN,
    TEAM_TAG,
    ApplyResult,
    FeatureRef,
    FeatureViewInfo,
    HistoricalResult,
    MaterializedViews,
    OnlineColumn,
    Ownership,
    StagedRepository,
    TableFormat,
)
from services.features.feast_engine import FeastEngine
from services.features.feast_errors import translated
from services.features.feast_history import join_keys_of, point_in_time_join
from services.features.feast_online import OnlinePlanner, OnlineReader
from services.features.feast_push import push_frame
from services.features.feast_sources import check_source, check_sources, source_warnings
from services.features.repository import DefinitionFiles, RepositoryFolder, load_repo_contents
from services.features.tables import check_entity_frame, decode_table, encode_table

if TYPE_CHECKING:
    import feast
    from feast.repo_contents import RepoContents

__all__ = ["FeastAdapter"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# sys.stdout is process-wide: one captured Feast call at a time.
_OUTPUT_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Staged:
    """The adapter's handle on staged files: where they are and what they define."""

    folder: Path
    contents: RepoContents


class FeastAdapter:
    """The features service's engine on a Feast repository.

    Args:
        engine: builds and holds the ``feast.FeatureStore``.
        folder: the definitions folder inside the repository.
        reads: runs online reads and online pushes.
        batch: runs applies, materializations, historical retrievals and offline pushes.
        plan_ttl_s: how long resolved feature references are cached.
        inline_read_max_keys: SQLite online reads of at most this many entity keys run on the
            event loop, never waiting for a lock (0: all in worker threads).
    """

    def __init__(
        self,
        *,
        engine: FeastEngine,
        folder: RepositoryFolder,
        reads: Executor,
        batch: Executor,
        plan_ttl_s: float = 10.0,
        inline_read_max_keys: int = 0,
    ) -> None:
        self._engine = engine
        self._folder = folder
        self._reads = reads
        self._batch = batch
        self._plan_ttl_s = plan_ttl_s
        self._inline_read_max_keys = inline_read_max_keys
        self._online: tuple[Any, OnlinePlanner, OnlineReader] | None = None
        # (store, monotonic expiry, ownership): refreshed like plans, dropped on apply.
        self._ownership: tuple[Any, float, Ownership] | None = None

    # --- helpers ------------------------------------------------------------------------------

    def _store(self) -> feast.FeatureStore:
        try:
            return self._engine.store
        except RuntimeError:
            raise Unavailable(
                "the Feast feature store is starting; retry shortly",
                dependency="Feast feature store",
            ) from None

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

    async def _in(self, executor: Executor, fn: Callable[[], T]) -> T:
        # The trace context follows the call into the worker thread; known Feast failures
        # become domain errors there.
        context = contextvars.copy_context()

        def run() -> T:
            with translated():
                return fn()

        return await asyncio.get_running_loop().run_in_executor(executor, context.run, run)

    # --- repository ---------------------------------------------------------------------------

    async def stage(self, definitions: DefinitionFiles) -> StagedRepository:
        """Writes the files to a staging folder and loads them (executing them, as Feast does).

        Raises:
            InvalidArgument: a file fails to load, naming it; or it declares another project.
        """
        store = self._store()
        staging = await self._in(self._batch, lambda: self._folder.stage(definitions))
        try:
            contents = await self._in(
                self._batch, lambda: load_repo_contents(staging, project=store.project)
            )
            warnings = await self._in(
                self._batch, lambda: source_warnings(store, contents.data_sources)
            )
        except BaseException:
            await self._in(self._batch, lambda: self._folder.discard(staging))
            raise
        views = [*contents.feature_views, *contents.stream_feature_views]
        return StagedRepository(
            entities=tuple(e.name for e in contents.entities if not e.name.startswith("__")),
            feature_views=tuple(v.name for v in views),
            on_demand_feature_views=tuple(v.name for v in contents.on_demand_feature_views),
            feature_services=tuple(s.name for s in contents.feature_services),
            data_sources=tuple(s.name for s in contents.data_sources if s.name),
            warnings=tuple(warnings),
            handle=_Staged(folder=staging, contents=contents),
        )

    async def apply(self, staged: StagedRepository) -> ApplyResult:
        """Applies staged definitions (``feast apply``) and makes them the current files.

        Raises:
            InvalidArgument: Feast refuses the definitions (its message names the problem).
            Unavailable: the online store cannot be reached to create or drop tables.
        """
        store = self._store()
        handle: _Staged = staged.handle
        deleted = await self._in(self._batch, lambda: _apply(store, handle.contents))
        await self._in(self._batch, lambda: self._folder.promote(handle.folder))
        if self._online is not None:
            self._online[1].invalidate()
        self._ownership = None
        return ApplyResult(
            entities=staged.entities,
            feature_views=staged.feature_views,
            on_demand_feature_views=staged.on_demand_feature_views,
            feature_services=staged.feature_services,
            data_sources=staged.data_sources,
            deleted=deleted,
            warnings=staged.warnings,
        )

    async def discard(self, staged: StagedRepository) -> None:
        """Removes staged files that are not applied."""
        handle: _Staged = staged.handle
        await self._in(self._batch, lambda: self._folder.discard(handle.folder))

    async def list_feature_views(self) -> list[FeatureViewInfo]:
        """Every feature view of the project (batch, stream and push-fed), by name."""
        store = self._store()

        def listing() -> list[FeatureViewInfo]:
            views = [
                *store.list_feature_views(allow_cache=True),
                *store.list_stream_feature_views(allow_cache=True),
            ]
            return [_view_info(v) for v in sorted(views, key=lambda v: v.name)]

        return await self._in(self._batch, listing)

    async def ownership(self) -> Ownership:
        """Each view's ``team`` tag, on-demand views' sources and push sources' views.

        Cached for ``plan_ttl_s`` seconds (the serving path asks on every read) and dropped by
        an apply through this service.
        """
        store = self._store()
        cached = self._ownership
        if cached is not None and cached[0] is store and cached[1] > time.monotonic():
            return cached[2]
        # The read pool: a long materialization in the batch pool must not hold up reads.
        owners = await self._in(self._reads, lambda: _ownership_of(store))
        self._ownership = (store, time.monotonic() + self._plan_ttl_s, owners)
        return owners

    # --- materialization ----------------------------------------------------------------------

    async def materialize(
        self, views: Sequence[str], start: datetime, end: datetime
    ) -> MaterializedViews:
        """Loads ``[start, end)`` of ``views`` (all online views when empty) into the online store.

        Raises:
            NotFound: an unknown feature view.
            FailedPrecondition: a view that is not materialized (offline only), or whose data
                source cannot be read.
        """
        store = self._store()

        def run() -> MaterializedViews:
            names = _views_to_materialize(store, views)
            with _feast_output_logged():
                store.materialize(start, end, feature_views=list(names))
            return MaterializedViews(feature_views=names)

        return await self._in(self._batch, run)

    async def materialize_incremental(
        self, views: Sequence[str], end: datetime
    ) -> MaterializedViews:
        """Loads what arrived since each view's last materialization (or its TTL) up to ``end``.

        Raises:
            NotFound: an unknown feature view.
            FailedPrecondition: a view with neither a TTL nor an earlier materialization, or
                whose data source cannot be read.
        """
        store = self._store()

        def run() -> MaterializedViews:
            names = _views_to_materialize(store, views)
            starts = _incremental_starts(store, names, end)
            with _feast_output_logged():
                store.materialize_incremental(end, feature_views=list(names))
            return MaterializedViews(feature_views=names, start_time=min(starts, default=None))

        return await self._in(self._batch, run)

    # --- online -------------------------------------------------------------------------------

    async def online_features(
        self, refs: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> list[OnlineColumn]:
        """Latest values of ``refs`` for each entity row (see ``FeaturesService``).

        Raises:
            InvalidArgument: a missing or mistyped join key (named).
            NotFound: an unknown feature view or feature (named).
            Unavailable: the online store cannot be reached.
        """
        with translated():
            planner, reader = self._online_parts()
            return await reader.read(planner.plan(refs), rows)

    async def push(
        self, push_source: str, rows: Sequence[Mapping[str, Any]], *, to_offline: bool
    ) -> int:
        """Writes rows through a push source to the views it feeds (and the offline store).

        Raises:
            InvalidArgument: a missing, unknown or mistyped column (named).
            NotFound: an unknown push source.
            FailedPrecondition: the push source feeds no view, or (``to_offline``) its batch
                source cannot be read.
            Unavailable: the online store cannot be reached.
        """
        store = self._store()

        def write() -> int:
            from feast.data_source import PushMode

            frame = push_frame(store, push_source, rows)
            if to_offline:
                source: Any = store.get_data_source(push_source)  # a PushSource: push_frame checked
                check_source(store, source.batch_source)
            store.push(
                push_source,
                frame,
                to=PushMode.ONLINE_AND_OFFLINE if to_offline else PushMode.ONLINE,
            )
            return len(frame)

        return await self._in(self._batch if to_offline else self._reads, write)

    # --- offline ------------------------------------------------------------------------------

    async def historical_features(
        self,
        refs: Sequence[FeatureRef],
        entity_table: bytes,
        table_format: TableFormat,
        *,
        full_feature_names: bool,
    ) -> HistoricalResult:
        """Point-in-time correct features for each row of an entity table (see the service).

        Raises:
            InvalidArgument: a malformed entity table (naming the column).
            NotFound: an unknown feature view or feature (named).
            FailedPrecondition: a view whose data source cannot be read.
        """
        store = self._store()
        names = [f"{view}:{feature}" for view, feature in refs]

        def retrieve() -> HistoricalResult:
            join_keys = join_keys_of(store, refs)
            table = decode_table(entity_table, table_format)
            frame = table.to_pandas()
            check_entity_frame(frame, join_keys, timestamp_column=ENTITY_TIMESTAMP_COLUMN)
            result = point_in_time_join(
                store, table, frame, list(join_keys), names, full_feature_names
            )
            return HistoricalResult(
                table=encode_table(result, table_format), format=table_format, rows=result.num_rows
            )

        return await self._in(self._batch, retrieve)


# --- Feast's output ------------------------------------------------------------------------------


class _LogLines(io.TextIOBase):
    """A text stream that logs each complete line (colours stripped) at ``level``."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        # tqdm redraws with '\r': each redraw counts as a line.
        lines = (self._pending + text).replace("\r", "\n").split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending)
            self._pending = ""

    def _emit(self, line: str) -> None:
        clean = _ANSI.sub("", line).strip()
        if clean:
            log.log(self._level, "feast: %s", clean)


@contextlib.contextmanager
def _feast_output_logged() -> Iterator[None]:
    """Sends what Feast prints (progress, "Created table ...") to the service's JSON log.

    Feast's apply and materialize ``print`` to stdout and draw tqdm bars on stderr; the log
    handler keeps the original stderr, so redirecting both loses nothing and keeps every line
    of the process's log JSON.
    """
    out, err = _LogLines(logging.INFO), _LogLines(logging.DEBUG)
    with _OUTPUT_LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            yield
        finally:
            out.flush()
            err.flush()


# --- Feast helpers (run in worker threads) ---------------------------------------------------------


def _apply(store: feast.FeatureStore, contents: RepoContents) -> tuple[str, ...]:
    """``feast apply`` of ``contents``; returns ``kind:name`` of the objects it deleted."""
    from feast.errors import FeastError
    from feast.repo_operations import (
        apply_total_with_repo_instance,
        extract_objects_for_apply_delete,
    )

    registry = store.registry
    _, to_delete, _, _ = extract_objects_for_apply_delete(store.project, registry, contents)
    try:
        with _feast_output_logged():
            apply_total_with_repo_instance(
                store, store.project, registry, contents, skip_source_validation=False
            )
    except (FeastError, ValueError, TypeError) as exc:
        # Feast validates the user's definitions with these: its message is about them. An
        # online store that cannot be reached raises others (translated by the caller).
        raise InvalidArgument(
            "files", f"Feast refused the definitions: {type(exc).__name__}: {exc}"
        ) from None
    return tuple(f"{type(o).__name__}:{o.name}" for o in to_delete if not o.name.startswith("__"))


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
        materialized_until=_utc(view.most_recent_end_time),
    )


def _utc(value: datetime | None) -> datetime | None:
    # Feast keeps the registry's times naive or aware depending on the path they took.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _ownership_of(store: feast.FeatureStore) -> Ownership:
    from feast.data_source import PushSource

    views = [
        *store.list_feature_views(allow_cache=True),
        *store.list_stream_feature_views(allow_cache=True),
    ]
    on_demand = store.list_on_demand_feature_views(allow_cache=True)
    teams = {v.name: str(v.tags.get(TEAM_TAG, "")) for v in [*views, *on_demand]}
    fed: dict[str, list[str]] = {}
    for view in views:
        stream = getattr(view, "stream_source", None)
        if isinstance(stream, PushSource):
            fed.setdefault(stream.name, []).append(view.name)
    return Ownership(
        view_teams=teams,
        view_sources={v.name: tuple(sorted(v.source_feature_view_projections)) for v in on_demand},
        push_views={source: tuple(names) for source, names in fed.items()},
        materializable=tuple(sorted(v.name for v in views if v.online)),
    )


def _views_to_materialize(store: feast.FeatureStore, names: Sequence[str]) -> tuple[str, ...]:
    from feast.errors import FeatureViewNotFoundException

    try:
        # Feast's own choice of views (all online, enabled ones when none are named).
        views = store._get_feature_views_to_materialize(list(names) or None)
    except FeatureViewNotFoundException as exc:
        missing = next((n for n in names if not _has_view(store, n)), None)
        if missing is None:
            raise
        raise NotFound("feature view", missing) from exc
    except ValueError as exc:
        # Feast's words for a view that is not materialized (online=False, no batch source).
        raise FailedPrecondition(str(exc)) from None
    check_sources(store, views)
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
