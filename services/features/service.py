"""The features service's domain logic: apply, list, materialize, online, push, offline.

Imports neither grpc nor nats nor Feast. The engine (:class:`FeatureEngine`, Feast's adapter in
production) does the work; the service checks the caller, requests and names, runs registry
changes one at a time, times materializations and records their events.

Access: a feature view belongs to the team its Feast tag ``team`` names (a view without one is
admins' only). Every call takes the verified caller and needs its permission on the team of
every view the request names (``view:feature`` references, view names, a push source's views,
an on-demand view's sources); another team's view answers NOT_FOUND, exactly as a missing one.
``ApplyRepository`` runs the repository's Python on this host: admins only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from plinth_common.auth import Principal, may, require, require_admin
from plinth_common.auth.access import denied
from plinth_common.auth.permissions import (
    FEATURES_APPLY,
    FEATURES_MATERIALIZE,
    FEATURES_PUSH,
    FEATURES_READ,
    Permission,
)
from plinth_common.db import Database
from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.features.domain import (
    MAX_PUSH_ROWS,
    TEAM_TAG,
    ApplyResult,
    FeatureRef,
    FeatureViewInfo,
    HistoricalResult,
    Materialization,
    MaterializedViews,
    OnlineColumn,
    Ownership,
    StagedRepository,
    TableFormat,
    check_defined_names,
    check_view_names,
    parse_feature_refs,
)
from services.features.freshness import FeatureObserver, Freshness, FreshnessStore
from services.features.repository import DefinitionFiles, Limits, validate_files
from services.features.tables import detect_format

__all__ = ["FeatureEngine", "FeatureEvents", "FeatureObserver", "FeaturesService"]

log = logging.getLogger(__name__)


class FeatureEngine(Protocol):
    """What the service needs from a feature store engine (Feast's adapter in production).

    Every method raises a :class:`~plinth_common.errors.PlinthError` for a failure it knows
    (unknown object, bad request, store unreachable); anything else propagates unchanged.
    """

    async def stage(self, definitions: DefinitionFiles) -> StagedRepository:
        """Writes and loads definition files without applying them."""
        ...

    async def apply(self, staged: StagedRepository) -> ApplyResult:
        """Applies staged definitions; they replace the current ones."""
        ...

    async def discard(self, staged: StagedRepository) -> None:
        """Drops staged definitions that will not be applied."""
        ...

    async def list_feature_views(self) -> list[FeatureViewInfo]:
        """Every feature view, by name."""
        ...

    async def ownership(self) -> Ownership:
        """Each view's team and what names resolve to (may be a few seconds old)."""
        ...

    async def materialize(
        self, views: Sequence[str], start: datetime, end: datetime
    ) -> MaterializedViews:
        """Loads a window of the offline store into the online store."""
        ...

    async def materialize_incremental(
        self, views: Sequence[str], end: datetime
    ) -> MaterializedViews:
        """Loads what arrived since each view's last materialization."""
        ...

    async def online_features(
        self, refs: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> list[OnlineColumn]:
        """Latest values for each entity row."""
        ...

    async def push(
        self, push_source: str, rows: Sequence[Mapping[str, Any]], *, to_offline: bool
    ) -> int:
        """Writes rows through a push source; returns how many."""
        ...

    async def historical_features(
        self,
        refs: Sequence[FeatureRef],
        entity_table: bytes,
        table_format: TableFormat,
        *,
        full_feature_names: bool,
    ) -> HistoricalResult:
        """A point-in-time join onto the entity table."""
        ...


class FeatureEvents(Protocol):
    """Publishes the service's events inside the caller's transaction."""

    async def materialized(self, session: AsyncSession, run: Materialization, *, team: str) -> None:
        """Records ``plinth.features.materialized`` for the views of ``team``."""
        ...


class FeaturesService:
    """Entities, feature views, materialization and retrieval on one feature repository.

    Args:
        engine: the feature store engine.
        db: the service's database (for the outbox).
        events: the event publisher.
        limits: bounds on ``ApplyRepository`` uploads.
        observer: told of online reads and of each view's newest data (the metrics).
        freshness: keeps each view's newest data time across restarts (None: in memory).
    """

    def __init__(
        self,
        *,
        engine: FeatureEngine,
        db: Database,
        events: FeatureEvents,
        limits: Limits | None = None,
        observer: FeatureObserver | None = None,
        freshness: FreshnessStore | None = None,
    ) -> None:
        self._engine = engine
        self._observer = observer
        self._freshness = Freshness(freshness, observer)
        self._db = db
        self._events = events
        self._limits = limits or Limits()
        # Registry changes (apply, materialize) run one at a time: Feast's file registry is
        # read, changed and written whole by each.
        self._registry_writes = asyncio.Lock()

    # --- repository ---------------------------------------------------------------------------

    async def apply_repository(
        self, principal: Principal, files: Mapping[str, bytes]
    ) -> ApplyResult:
        """Replaces the repository's definition files and applies them (``feast apply``).

        Admins only: loading the files runs their Python on this host (checked here too, not
        only at the gateway).

        Returns:
            The names the repository holds, what was deleted, and warnings (a data source that
            cannot be read is applied, but its materialization would fail).

        Raises:
            PermissionDenied: the caller is no admin.
            InvalidArgument: a path, size or name is refused, or a file fails to load, naming it;
                or the engine refuses the definitions.
        """
        require_admin(principal, FEATURES_APPLY)
        definitions = validate_files(files, self._limits)
        async with self._registry_writes:
            staged = await self._engine.stage(definitions)
            try:
                check_defined_names(staged)
                result = await self._engine.apply(staged)
            except BaseException:
                await self._engine.discard(staged)
                raise
        await self._freshness.keep_only(result.feature_views)
        log.info(
            "applied %d feature views, deleted %s",
            len(result.feature_views),
            list(result.deleted) or "nothing",
        )
        for warning in result.warnings:
            log.warning("apply: %s", warning)
        return result

    async def list_feature_views(self, principal: Principal) -> list[FeatureViewInfo]:
        """The feature views of the project (batch, stream and push-fed) the caller may read."""
        views = [self._with_data_until(v) for v in await self._engine.list_feature_views()]
        if _unrestricted(principal, FEATURES_READ):
            return views
        return [v for v in views if may(principal, FEATURES_READ, v.tags.get(TEAM_TAG, ""))]

    def _with_data_until(self, view: FeatureViewInfo) -> FeatureViewInfo:
        known = [t for t in (self._freshness.newest(view.name), view.materialized_until) if t]
        return dataclasses.replace(view, data_until=max(known)) if known else view

    async def _owners(self, principal: Principal, permission: Permission) -> Ownership | None:
        """The ownership to check the caller against; None when the caller may act on all."""
        if _unrestricted(principal, permission):
            return None
        return await self._engine.ownership()

    # --- freshness ----------------------------------------------------------------------------

    async def load_freshness(self) -> None:
        """Tells the observer each view's newest data time as the store knows it (at start,
        before Feast loads)."""
        await self._freshness.load()

    async def restore_freshness(self) -> None:
        """Tells the observer each view's newest data time as the store and Feast's registry
        know it (at start, before serving: a restart shows no gap and no false "fresh")."""
        await self._freshness.restore(await self._engine.list_feature_views())

    async def flush_freshness(self) -> None:
        """Writes the push times not written yet (at a graceful stop, after the last call)."""
        await self._freshness.flush()

    # --- materialization ----------------------------------------------------------------------

    async def materialize(
        self,
        principal: Principal,
        views: Sequence[str],
        start: datetime | None,
        end: datetime | None,
    ) -> Materialization:
        """Loads ``[start, end)`` from the offline store into the online store.

        No views named: all online views (of the teams the caller may materialize for).

        Raises:
            InvalidArgument: a missing or inverted window, or a malformed view name.
            NotFound: an unknown feature view, or another team's.
            PermissionDenied: the caller's role in a view's team is below developer.
            FailedPrecondition: a view that is not served online, or whose source is unreadable.
        """
        if start is None:
            raise InvalidArgument("start_time", "required")
        if end is None:
            raise InvalidArgument("end_time", "required")
        if start >= end:
            raise InvalidArgument("start_time", "must be before end_time")
        names = await self._materializable(principal, check_view_names(views))
        return await self._materialization(
            lambda: self._engine.materialize(names, start, end), start, end
        )

    async def materialize_incremental(
        self, principal: Principal, views: Sequence[str], end: datetime | None
    ) -> Materialization:
        """Loads what arrived since each view's last materialization (or its TTL) up to ``end``.

        Raises:
            InvalidArgument: a missing end time, or a malformed view name.
            NotFound: an unknown feature view, or another team's.
            PermissionDenied: the caller's role in a view's team is below developer.
            FailedPrecondition: a view with neither a TTL nor an earlier materialization.
        """
        if end is None:
            raise InvalidArgument("end_time", "required")
        names = await self._materializable(principal, check_view_names(views))
        return await self._materialization(
            lambda: self._engine.materialize_incremental(names, end), None, end
        )

    async def _materializable(self, principal: Principal, names: list[str]) -> list[str]:
        """The views to materialize: those named, checked; or, none named, all of the caller's.

        Raises:
            NotFound: a named view the caller may not see.
            PermissionDenied: a named view, or (none named) every visible one, needs a higher role.
            FailedPrecondition: none named, and the caller's teams have no online view.
        """
        owners = await self._owners(principal, FEATURES_MATERIALIZE)
        if owners is None:
            return names
        if names:
            _require_views(principal, FEATURES_MATERIALIZE, owners, names)
            return names
        visible = [v for v in owners.materializable if principal.can_see(owners.view_teams[v])]
        mine = [v for v in visible if may(principal, FEATURES_MATERIALIZE, owners.view_teams[v])]
        if mine:
            return mine
        if visible:
            raise denied(
                FEATURES_MATERIALIZE, "the team's feature views", FEATURES_MATERIALIZE.role
            )
        raise FailedPrecondition("no feature view of the caller's teams is served online")

    async def _materialization(
        self,
        run: Callable[[], Awaitable[MaterializedViews]],
        start: datetime | None,
        end: datetime,
    ) -> Materialization:
        async with self._registry_writes:
            began = time.monotonic()
            done = await run()
            duration = time.monotonic() - began
        result = Materialization(
            feature_views=done.feature_views,
            start_time=done.start_time or start,
            end_time=end,
            duration_seconds=duration,
        )
        teams = await self._teams_of(result.feature_views)
        async with self._db.transaction() as session:
            # One event per owning team, so each team's watchers see their own views only.
            for team, names in teams.items():
                await self._events.materialized(
                    session, dataclasses.replace(result, feature_views=names), team=team
                )
        log.info("materialized %s in %.3f s", list(result.feature_views), duration)
        await self._freshness.materialized(result.feature_views, end)
        return result

    async def _teams_of(self, views: Sequence[str]) -> dict[str, tuple[str, ...]]:
        owners = await self._engine.ownership()
        teams: dict[str, list[str]] = {}
        for view in views:
            teams.setdefault(owners.team_of(view) or "", []).append(view)
        return {team: tuple(names) for team, names in teams.items()}

    # --- online -------------------------------------------------------------------------------

    async def get_online_features(
        self, principal: Principal, refs: Sequence[str], rows: Sequence[Mapping[str, Any]]
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
            NotFound: an unknown feature view or feature (named), or another team's view.
            Unavailable: the online store cannot be reached.
        """
        owners = await self._owners(principal, FEATURES_READ)
        if owners is not None:
            _require_views(
                principal, FEATURES_READ, owners, [view for view, _ in parse_feature_refs(refs)]
            )
        began = time.perf_counter()
        columns = await self._engine.online_features(refs, rows)
        if self._observer is not None:
            views = sorted({view for view, _ in parse_feature_refs(refs)})
            self._observer.online_read(views, time.perf_counter() - began)
        return columns

    async def push(
        self,
        principal: Principal,
        push_source: str,
        rows: Sequence[Mapping[str, Any]],
        *,
        to_offline: bool,
    ) -> int:
        """Writes rows through a push source to the views it feeds (and the offline store).

        The caller needs ``features.push`` on the team of every view the source feeds.

        Raises:
            InvalidArgument: no rows, or a missing, unknown or mistyped column (named).
            NotFound: an unknown push source, or one feeding another team's view.
            PermissionDenied: the caller's role in a fed view's team is below developer.
            Unavailable: the online store cannot be reached.
        """
        if not push_source:
            raise InvalidArgument("push_source", "required")
        if not rows:
            raise InvalidArgument("rows", "at least one row is required")
        if len(rows) > MAX_PUSH_ROWS:
            raise InvalidArgument("rows", f"{len(rows)} rows, at most {MAX_PUSH_ROWS} per request")
        owners = await self._owners(principal, FEATURES_PUSH)
        if owners is not None:
            fed = owners.push_views.get(push_source)
            if not fed:  # unknown, or feeding no view (so owned by no team)
                raise NotFound("push source", push_source)
            for view in fed:
                require(
                    principal,
                    FEATURES_PUSH,
                    owners.view_teams.get(view, ""),
                    kind="push source",
                    name=push_source,
                )
        written = await self._engine.push(push_source, rows, to_offline=to_offline)
        fed = (await self._engine.ownership()).push_views.get(push_source, ())
        await self._freshness.pushed(tuple(fed), datetime.now(UTC))
        return written

    # --- offline ------------------------------------------------------------------------------

    async def get_historical_features(
        self,
        principal: Principal,
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
            NotFound: an unknown feature view or feature (named), or another team's view.
        """
        parsed = parse_feature_refs(refs)
        owners = await self._owners(principal, FEATURES_READ)
        if owners is not None:
            _require_views(principal, FEATURES_READ, owners, [view for view, _ in parsed])
        if not entity_table:
            raise InvalidArgument(
                "entity_table", "empty: send an Arrow IPC stream or a Parquet file"
            )
        fmt = table_format or detect_format(entity_table)
        return await self._engine.historical_features(
            parsed, entity_table, fmt, full_feature_names=full_feature_names
        )


def _unrestricted(principal: Principal, permission: Permission) -> bool:
    """Admins, and the Plinth services the permission names, act on every team's views."""
    return principal.admin or (principal.is_service and principal.name in permission.services)


def _require_views(
    principal: Principal, permission: Permission, owners: Ownership, views: Sequence[str]
) -> None:
    """Raises unless the caller holds ``permission`` on every view a request names (and on
    what an on-demand view reads).

    Raises:
        NotFound: a view that does not exist or belongs to a team the caller is no member of
            (the same answer, so existence does not leak).
        PermissionDenied: the caller's role in a view's team is too low.
    """
    for requested in dict.fromkeys(views):
        for view in owners.read_by(requested):
            team = owners.view_teams.get(view)
            if team is None:
                raise NotFound("feature view", view)
            require(principal, permission, team, kind="feature view", name=view)
