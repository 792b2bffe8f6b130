"""The features service's domain: what a repository holds, what a read returns, and the rules.

Plain data and pure functions only: no Feast, pandas or pyarrow here (the Feast adapter turns
Feast's objects into these), so the service and its tests import in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, IntEnum
from typing import Any

from plinth_common.errors import InvalidArgument
from plinth_common.names import check_feature_view_name

__all__ = [
    "ENTITY_TIMESTAMP_COLUMN",
    "MAX_ENTITY_ROWS",
    "MAX_PUSH_ROWS",
    "TEAM_TAG",
    "ApplyResult",
    "FeatureRef",
    "FeatureViewInfo",
    "FieldStatus",
    "HistoricalResult",
    "Materialization",
    "MaterializedViews",
    "OnlineColumn",
    "Ownership",
    "StagedRepository",
    "TableFormat",
    "parse_feature_refs",
]

#: The Feast tag that names a feature view's owning team; a view without it is admins' only.
TEAM_TAG = "team"
#: The entity table's timestamp column in point-in-time retrieval.
ENTITY_TIMESTAMP_COLUMN = "event_timestamp"
#: Rows one ``PushFeatures`` call may write.
MAX_PUSH_ROWS = 10_000
#: Entity rows one ``GetOnlineFeatures`` call may read.
MAX_ENTITY_ROWS = 10_000


class TableFormat(Enum):
    """How a table travels as bytes."""

    ARROW_IPC = "arrow_ipc"
    PARQUET = "parquet"


class FieldStatus(IntEnum):
    """Status of one value, as Feast reports it (the numbers are ``plinth.features.v1``'s)."""

    PRESENT = 1
    NOT_FOUND = 2
    NULL_VALUE = 3
    OUTSIDE_MAX_AGE = 4


@dataclass(frozen=True, kw_only=True)
class StagedRepository:
    """Definition files written and loaded but not applied yet: the names they define.

    Attributes:
        entities: entity names (Feast's internal ones left out).
        feature_views: batch, stream and push-fed view names.
        on_demand_feature_views: on-demand view names.
        feature_services: feature service names.
        data_sources: data source names.
        warnings: problems that do not stop the apply but will stop a later call (a data
            source that cannot be read), one sentence each.
        handle: the engine's own reference to the staged files.
    """

    entities: tuple[str, ...]
    feature_views: tuple[str, ...]
    on_demand_feature_views: tuple[str, ...]
    feature_services: tuple[str, ...]
    data_sources: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    handle: Any = None


@dataclass(frozen=True, kw_only=True)
class ApplyResult:
    """What the repository holds after an apply (names), what the apply deleted, and warnings."""

    entities: tuple[str, ...]
    feature_views: tuple[str, ...]
    on_demand_feature_views: tuple[str, ...]
    feature_services: tuple[str, ...]
    data_sources: tuple[str, ...]
    deleted: tuple[str, ...]
    warnings: tuple[str, ...] = ()


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
    #: The end of the newest materialization Feast's registry records (None: never).
    materialized_until: datetime | None = None
    #: The newest data online: the latest materialization's end or push (None: neither yet).
    data_until: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class Ownership:
    """Which team owns each feature view, and what else a request's names resolve to.

    Attributes:
        view_teams: every feature view (batch, stream, push-fed, on-demand) -> the value of its
            ``team`` tag ("" when it has none: admins only).
        view_sources: on-demand view -> the feature views it reads (a read of it reads them).
        push_views: push source -> the feature views it feeds.
        materializable: the views a materialization of "all" covers (online batch and stream
            views), by name.
    """

    view_teams: Mapping[str, str] = field(default_factory=dict)
    view_sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    push_views: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    materializable: tuple[str, ...] = ()

    def team_of(self, view: str) -> str | None:
        """The view's team ("" untagged); None when there is no such view."""
        return self.view_teams.get(view.partition("@")[0])

    def read_by(self, view: str) -> tuple[str, ...]:
        """The views a read of ``view`` (``name`` or ``name@version``) reads: it, and for an
        on-demand view the views it is computed from."""
        name = view.partition("@")[0]
        return (name, *self.view_sources.get(name, ()))


@dataclass(frozen=True, kw_only=True)
class MaterializedViews:
    """What the engine loaded: the views, and where an incremental run started (earliest)."""

    feature_views: tuple[str, ...]
    start_time: datetime | None = None


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


FeatureRef = tuple[str, str]


def parse_feature_refs(refs: Sequence[str], *, field_name: str = "features") -> list[FeatureRef]:
    """Splits ``view:feature`` references and checks the view names.

    A view may carry a version (``view@v2:feature``); the name before ``@`` follows
    :func:`~plinth_common.names.check_feature_view_name`.

    Raises:
        InvalidArgument: empty list, malformed or duplicate reference, or a bad view name,
            naming ``features[i]``.
    """
    if not refs:
        raise InvalidArgument(
            field_name, "at least one feature reference (view:feature) is required"
        )
    seen: set[str] = set()
    parsed: list[FeatureRef] = []
    for i, ref in enumerate(refs):
        where = f"{field_name}[{i}]"
        view, sep, feature = ref.partition(":")
        if not sep or not view or not feature or ":" in feature:
            raise InvalidArgument(where, f"{ref!r} is not a 'view:feature' reference")
        check_feature_view_name(view.partition("@")[0], where)
        if ref in seen:
            raise InvalidArgument(where, f"{ref!r} is requested twice")
        seen.add(ref)
        parsed.append((view, feature))
    return parsed


def check_view_names(names: Sequence[str], *, field_name: str = "feature_views") -> list[str]:
    """Checks each of a list of feature view names, naming ``feature_views[i]``."""
    return [check_feature_view_name(n, f"{field_name}[{i}]") for i, n in enumerate(names)]


def check_defined_names(staged: StagedRepository) -> None:
    """Refuses definitions whose names the rest of the API could not address.

    Raises:
        InvalidArgument: on ``files``, repeating the bad name.
    """
    for name in (
        *staged.entities,
        *staged.feature_views,
        *staged.on_demand_feature_views,
        *staged.feature_services,
    ):
        check_feature_view_name(name, "files")
