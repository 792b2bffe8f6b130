"""Serving's domain: deployments, the versions they follow, and the rules of their life cycle.

A deployment follows one alias of one registered model. The alias's version, as last heard (from
a ``plinth.model.promoted`` event, or from the registry when the deployment is created), is its
*target*. Its state says where it stands relative to that target:

- PENDING: no target yet (the alias points nowhere, or the registry was not asked yet);
- LOADING: a target that is neither served nor failed;
- READY: the target is the version that answers;
- FAILED: the target could not be served (the previous version, if any, keeps answering), or
  the registry refused for good to say where the alias points;
- UNAVAILABLE: the serving engine is down. Never stored: it is how :func:`engine_down` shows a
  deployment while serving heals its engine, after which the stored state shows again.

Pure values and functions: no I/O, no grpc, no nats, no SQL.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from plinth_common.errors import InvalidArgument, PlinthError
from plinth_common.names import (
    DEFAULT_ALIAS,
    check_alias,
    check_deployment_name,
    check_model_name,
    check_team,
)
from services.serving.signature import ModelIO

DEFAULT_MAX_BATCH_SIZE = 8
MAX_BATCH_SIZE = 1024
MAX_QUEUE_DELAY_US = 1_000_000
MAX_INSTANCES = 16
#: Most teams one deployment may be shared with.
MAX_SHARED_TEAMS = 64
#: Longest ``last_error`` (and failure reason) kept.
MAX_REASON = 2000
# Column sizes of what a promotion event carries (kept, cut, even when malformed: see retarget).
_MAX_VERSION, _MAX_SOURCE, _MAX_RUN_ID = 32, 4096, 64


class DeploymentState(enum.StrEnum):
    """Where a deployment is relative to its target version."""

    PENDING = "PENDING"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, kw_only=True)
class BatchingSettings:
    """The Triton settings of a deployment.

    Attributes:
        max_batch_size: largest batch Triton hands the model.
        max_queue_delay_us: dynamic batching's wait for more requests; 0 turns batching off.
        instance_count: model instances (Python stub processes) on the CPU.
    """

    max_batch_size: int
    max_queue_delay_us: int
    instance_count: int


#: What a request's zeros mean: the defaults.
UNSET_BATCHING = BatchingSettings(max_batch_size=0, max_queue_delay_us=0, instance_count=0)


@dataclass(frozen=True, kw_only=True)
class DeploymentSpec:
    """What a user asks for; an empty alias and zeros in ``batching`` mean the defaults."""

    name: str
    team: str
    model_name: str
    alias: str = ""
    batching: BatchingSettings = UNSET_BATCHING
    shared_with: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class DeploymentAccess:
    """Who may call a deployment for inference: the members of its team, and read-only the
    members of the teams it is shared with (admins always). One row of the table a data-plane
    proxy needs to authorize inference without asking serving per request.

    Attributes:
        team: the owning team.
        shared_with: teams whose members may call it for inference.
    """

    team: str
    shared_with: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class VersionRef:
    """A registered model version: its number, artifact URI and run."""

    version: str
    source: str
    run_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Promotion:
    """An alias moved (the payload of ``plinth.model.promoted`` plus the event's time); ``team``
    owns the model ('' when the event does not say)."""

    model_name: str
    alias: str
    version: str
    source: str
    run_id: str
    time: datetime
    team: str = ""


@dataclass(frozen=True, kw_only=True)
class Deployment:
    """A deployment as the service knows it.

    Attributes:
        seq: insertion order (paging key); 0 before it is stored.
        name: what clients call it (a DNS label).
        team: the owning team.
        model_name: the registered model it follows.
        alias: the alias of that model it follows.
        batching: its Triton settings.
        shared_with: teams whose members may call it for inference (read-only), sorted.
        state: derived from the versions below (see :func:`state_of`).
        serving_version: the version that answers ('' when none).
        serving_io: that version's tensors.
        loading_version: the version a rollout is loading now.
        target_version: where the alias points, as last heard.
        target_source: the target's artifact URI.
        target_run_id: the target's run.
        target_time: when the alias moved there (orders promotions).
        target_traceparent: the trace the rollout continues.
        failed_version: a target that failed; not retried until a promotion names it again.
        last_error: why the last rollout or registry lookup failed.
        lookup_pending: the registry has not yet said where the alias points.
        created_at: creation time.
        updated_at: last change.
    """

    seq: int = 0
    name: str
    team: str
    model_name: str
    alias: str
    batching: BatchingSettings
    shared_with: tuple[str, ...] = ()
    state: DeploymentState = DeploymentState.PENDING
    serving_version: str = ""
    serving_io: ModelIO | None = None
    loading_version: str = ""
    target_version: str = ""
    target_source: str = ""
    target_run_id: str = ""
    target_time: datetime | None = None
    target_traceparent: str = ""
    failed_version: str = ""
    last_error: str = ""
    lookup_pending: bool = False
    created_at: datetime
    updated_at: datetime

    @property
    def needs_rollout(self) -> bool:
        """True when the target is neither served nor failed."""
        return bool(self.target_version) and self.target_version not in (
            self.serving_version,
            self.failed_version,
        )

    @property
    def access(self) -> DeploymentAccess:
        """Who may call it for inference."""
        return DeploymentAccess(team=self.team, shared_with=frozenset(self.shared_with))

    def changed(self, now: datetime, **changes: Any) -> Deployment:
        """A copy with ``changes`` applied, its state derived again, and ``updated_at`` = now."""
        updated = dataclasses.replace(self, updated_at=now, **changes)
        return dataclasses.replace(updated, state=state_of(updated))


@dataclass(frozen=True, kw_only=True)
class Route:
    """Where inference for a deployment goes.

    Attributes:
        deployment: the name clients use.
        version: the registered model version that answers.
        triton_model: the Triton model that serves it.
        io: its tensors.
        max_batch_size: the largest batch one request may carry.
    """

    deployment: str
    version: str
    triton_model: str
    io: ModelIO
    max_batch_size: int


def now() -> datetime:
    """The current time, in UTC (every time here is UTC)."""
    return datetime.now(UTC)


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC time (SQLite hands back naive datetimes)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def reason_of(exc: BaseException) -> str:
    """A failure's reason as a deployment records it: the domain message, bounded."""
    text = exc.message if isinstance(exc, PlinthError) else str(exc)
    return (text or type(exc).__name__)[:MAX_REASON]


# -- rules -------------------------------------------------------------------------------------


def check_shared_with(teams: Iterable[str], owner: str) -> tuple[str, ...]:
    """The teams a deployment is shared with, checked, without repeats, sorted.

    Raises:
        InvalidArgument: ``shared_with`` names a team that is no DNS label, the owning team
            itself, or more than :data:`MAX_SHARED_TEAMS` teams.
    """
    checked = sorted({check_team(team, "shared_with") for team in teams})
    if owner in checked:
        raise InvalidArgument(
            "shared_with", f"names the owning team {owner!r}; its members have access already"
        )
    if len(checked) > MAX_SHARED_TEAMS:
        raise InvalidArgument("shared_with", f"{len(checked)} teams; at most {MAX_SHARED_TEAMS}")
    return tuple(checked)


def validate_spec(spec: DeploymentSpec) -> DeploymentSpec:
    """Checks a deployment request and fills in the defaults.

    Raises:
        InvalidArgument: naming the first field that is wrong (an alias MLflow reserves, such
            as ``latest``, is refused: the registry would never resolve it).
    """
    check_deployment_name(spec.name)
    check_team(spec.team)
    check_model_name(spec.model_name, "model_name")
    alias = check_alias(spec.alias or DEFAULT_ALIAS)
    b = spec.batching
    max_batch = b.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    if not 1 <= max_batch <= MAX_BATCH_SIZE:
        raise InvalidArgument(
            "triton.max_batch_size", f"between 1 and {MAX_BATCH_SIZE}, got {b.max_batch_size}"
        )
    if not 0 <= b.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
        raise InvalidArgument(
            "triton.max_queue_delay_microseconds",
            f"between 0 and {MAX_QUEUE_DELAY_US}, got {b.max_queue_delay_us}",
        )
    instances = b.instance_count or 1
    if not 1 <= instances <= MAX_INSTANCES:
        raise InvalidArgument(
            "triton.instance_count", f"between 1 and {MAX_INSTANCES}, got {b.instance_count}"
        )
    return dataclasses.replace(
        spec,
        alias=alias,
        shared_with=check_shared_with(spec.shared_with, spec.team),
        batching=BatchingSettings(
            max_batch_size=max_batch,
            max_queue_delay_us=b.max_queue_delay_us,
            instance_count=instances,
        ),
    )


def new_deployment(spec: DeploymentSpec, at: datetime) -> Deployment:
    """A deployment for a validated spec: PENDING until the registry says where its alias points."""
    return Deployment(
        name=spec.name,
        team=spec.team,
        model_name=spec.model_name,
        alias=spec.alias,
        batching=spec.batching,
        shared_with=spec.shared_with,
        lookup_pending=True,
        created_at=at,
        updated_at=at,
    )


def state_of(d: Deployment) -> DeploymentState:
    """The state a deployment's versions put it in."""
    if not d.target_version:
        # A registry that refused for good leaves the deployment FAILED until a promotion.
        refused = not d.lookup_pending and bool(d.last_error)
        return DeploymentState.FAILED if refused else DeploymentState.PENDING
    if d.target_version == d.serving_version:
        return DeploymentState.READY
    if d.target_version == d.failed_version:
        return DeploymentState.FAILED
    return DeploymentState.LOADING


def retarget(d: Deployment, promotion: Promotion, *, traceparent: str, at: datetime) -> Deployment:
    """The deployment after its alias was promoted; unchanged when the promotion is older than
    its target (events may arrive out of order)."""
    when = utc(promotion.time)
    if d.target_time is not None and when < utc(d.target_time):
        return d
    version = promotion.version[:_MAX_VERSION]
    return d.changed(
        at,
        # Kept even when malformed (cut to the column's size), so that the rollout fails
        # visibly with the reason instead of the event being dropped.
        target_version=version,
        target_source=promotion.source[:_MAX_SOURCE],
        target_run_id=promotion.run_id[:_MAX_RUN_ID],
        target_time=when,
        # The rollout runs later, in a worker: it continues the promotion's trace.
        target_traceparent=traceparent,
        # Naming a version again is how a failed one gets another try.
        failed_version="",
        lookup_pending=False,
        last_error="" if version == d.serving_version else d.last_error,
    )


def resolved(
    d: Deployment, ref: VersionRef | None, *, traceparent: str, at: datetime
) -> Deployment:
    """The deployment once the registry said where its alias points (``None``: nowhere yet)."""
    if ref is None:
        return d.changed(at, lookup_pending=False, last_error="")
    return d.changed(
        at,
        lookup_pending=False,
        last_error="",
        target_version=ref.version[:_MAX_VERSION],
        target_source=ref.source[:_MAX_SOURCE],
        target_run_id=ref.run_id[:_MAX_RUN_ID],
        target_time=at,
        target_traceparent=traceparent,
    )


def lookup_retrying(d: Deployment, reason: str, *, at: datetime) -> Deployment:
    """The deployment while the registry cannot be reached: still pending, saying why."""
    return d.changed(at, last_error=f"registry: {reason}"[:MAX_REASON])


def lookup_refused(d: Deployment, reason: str, *, at: datetime) -> Deployment:
    """The deployment after the registry refused for good to resolve its alias: FAILED."""
    return d.changed(at, lookup_pending=False, last_error=f"registry: {reason}"[:MAX_REASON])


def loading(d: Deployment, *, at: datetime) -> Deployment:
    """The deployment while its target loads."""
    return d.changed(at, loading_version=d.target_version)


def switched(d: Deployment, version: str, io: ModelIO, *, at: datetime) -> Deployment:
    """The deployment once ``version`` answers."""
    return d.changed(
        at,
        serving_version=version,
        serving_io=io,
        loading_version="",
        failed_version="",
        last_error="",
    )


def rollout_failed(d: Deployment, version: str, reason: str, *, at: datetime) -> Deployment:
    """The deployment after ``version`` could not be served (the serving version stays)."""
    changes: dict[str, Any] = {
        "loading_version": "",
        "last_error": f"v{version}: {reason}"[:MAX_REASON],
    }
    if d.target_version == version:
        changes["failed_version"] = version
    return d.changed(at, **changes)


def postponed(d: Deployment, version: str, reason: str, *, at: datetime) -> Deployment:
    """The deployment after the model server was down while ``version`` loaded: still LOADING
    (the rollout runs again once the server answers), saying why."""
    return d.changed(at, loading_version="", last_error=f"v{version}: {reason}"[:MAX_REASON])


def settled(d: Deployment, *, at: datetime) -> Deployment:
    """The deployment with no load in progress (a load that ended without a switch)."""
    return d.changed(at, loading_version="")


def unserved(d: Deployment, *, at: datetime) -> Deployment:
    """The deployment whose serving version could not be restored: it rolls out again."""
    return d.changed(at, serving_version="", serving_io=None)


def engine_down(d: Deployment, reason: str) -> Deployment:
    """How a deployment shows while the serving engine is down: UNAVAILABLE with the reason,
    if it serves (or loads) a version; a deployment that waits for a version, or whose target
    failed, shows as it is. Not stored: once the engine is back the stored state shows again."""
    if not d.serving_version and d.state is not DeploymentState.LOADING:
        return d
    return dataclasses.replace(d, state=DeploymentState.UNAVAILABLE, last_error=reason[:MAX_REASON])
