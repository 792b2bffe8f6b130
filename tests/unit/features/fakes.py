"""Fakes at the features service's seams: an engine that records calls, events kept in a list."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

from plinth_common.db import Database
from services.features.domain import (
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
)
from services.features.repository import DefinitionFiles
from services.features.service import FeaturesService

START, END = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC)


class FakeEngine:
    """Records calls; stages the names it is told to; raises ``fail`` from the call named."""

    def __init__(
        self,
        *,
        views: Sequence[str] = ("driver_stats",),
        warnings: Sequence[str] = (),
        fail: Mapping[str, BaseException] | None = None,
        owners: Ownership | None = None,
    ) -> None:
        self.views = tuple(views)
        self.owners = owners or Ownership(view_teams=dict.fromkeys(views, ""))
        self.listed: list[FeatureViewInfo] = []
        self.warnings = tuple(warnings)
        self.fail = dict(fail or {})
        self.calls: list[tuple[str, Any]] = []

    def _call(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, arg))
        if name in self.fail:
            raise self.fail[name]

    async def stage(self, definitions: DefinitionFiles) -> StagedRepository:
        self._call("stage", sorted(str(p) for p in definitions.files))
        return StagedRepository(
            entities=("driver",),
            feature_views=self.views,
            on_demand_feature_views=(),
            feature_services=(),
            data_sources=("source",),
            warnings=self.warnings,
            handle="staged-1",
        )

    async def apply(self, staged: StagedRepository) -> ApplyResult:
        self._call("apply", staged.handle)
        return ApplyResult(
            entities=staged.entities,
            feature_views=staged.feature_views,
            on_demand_feature_views=(),
            feature_services=(),
            data_sources=staged.data_sources,
            deleted=(),
            warnings=staged.warnings,
        )

    async def discard(self, staged: StagedRepository) -> None:
        self._call("discard", staged.handle)

    async def list_feature_views(self) -> list[FeatureViewInfo]:
        self._call("list")
        return list(self.listed)

    async def ownership(self) -> Ownership:
        return self.owners

    async def materialize(
        self, views: Sequence[str], start: datetime, end: datetime
    ) -> MaterializedViews:
        self._call("materialize", list(views))
        return MaterializedViews(feature_views=tuple(views) or self.views)

    async def materialize_incremental(
        self, views: Sequence[str], end: datetime
    ) -> MaterializedViews:
        self._call("materialize_incremental", list(views))
        return MaterializedViews(feature_views=self.views, start_time=START)

    async def online_features(
        self, refs: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> list[OnlineColumn]:
        self._call("online", list(refs))
        return []

    async def push(
        self, push_source: str, rows: Sequence[Mapping[str, Any]], *, to_offline: bool
    ) -> int:
        self._call("push", push_source)
        return len(rows)

    async def historical_features(
        self,
        refs: Sequence[FeatureRef],
        entity_table: bytes,
        table_format: TableFormat,
        *,
        full_feature_names: bool,
    ) -> HistoricalResult:
        self._call("historical", (list(refs), table_format))
        return HistoricalResult(table=b"", format=table_format, rows=0)


class FakeDatabase:
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[object]:
        yield object()


class RecordedEvents:
    def __init__(self) -> None:
        self.materialized_runs: list[Materialization] = []
        self.teams: list[str] = []

    async def materialized(self, session: Any, run: Materialization, *, team: str) -> None:
        self.materialized_runs.append(run)
        self.teams.append(team)


def service_on(engine: FakeEngine) -> tuple[FeaturesService, RecordedEvents]:
    events = RecordedEvents()
    service = FeaturesService(engine=engine, db=cast(Database, FakeDatabase()), events=events)
    return service, events
