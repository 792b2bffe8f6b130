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

Traffic: the serving version (the alias's, the *stable* one) answers every request unless
``SetTraffic`` split it with *canaries*, other versions of the model each taking a share. A
canary whose error rate or p99 latency breaks the deployment's :class:`Slo` is rolled back (all
traffic to the stable version again); a promotion that rolls out replaces the whole split with
100% on the new version. ``SetTraffic`` with one version at 100% pins that version: it rolls out
like a promotion would, and the next promotion of the alias moves the deployment on again.

Pure values and functions: no I/O, no grpc, no nats, no SQL.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from plinth_common.errors import FailedPrecondition, InvalidArgument, PlinthError
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
#: Most versions one split may name (the stable one and its canaries).
MAX_SPLIT_VERSIONS = 4
MAX_LIMIT = 1_000_000
MAX_SLO_WINDOW_S = 3600
MAX_SLO_P99_MS = 600_000.0
#: Who moves traffic when no caller does (rollouts, rollbacks).
SERVING_ACTOR = "serving"
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
class VersionRef:
    """A registered model version: its number, artifact URI and run."""

    version: str
    source: str
    run_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Slo:
    """When a canary is rolled back: its error rate or p99 latency above these over the window.

    Attributes:
        max_error_rate_pct: errors per 100 requests.
        max_p99_ms: the 99th percentile of request latency, in milliseconds.
        window_s: how far back the canary's requests are judged.
    """

    max_error_rate_pct: float = 1.0
    max_p99_ms: float = 500.0
    window_s: int = 60


#: The SLO of a deployment created without one.
DEFAULT_SLO = Slo()
#: What a request's zeros mean: the defaults.
UNSET_SLO = Slo(max_error_rate_pct=0.0, max_p99_ms=0.0, window_s=0)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the inference data plane admits at once per deployment (0: unlimited).

    Attributes:
        max_concurrency: requests in flight to the model server.
        max_queue: requests waiting for one of those slots; beyond, refused at once.
    """

    max_concurrency: int = 0
    max_queue: int = 0


@dataclass(frozen=True, kw_only=True)
class Canary:
    """A version that takes a share of a deployment's traffic beside its serving version.

    Attributes:
        version: the registered model version.
        percent: its share of requests.
        source: its artifact URI (to load it again after a restart).
        run_id: its run.
        io: its tensors (None until loaded).
    """

    version: str
    percent: int
    source: str
    run_id: str = ""
    io: ModelIO | None = None


@dataclass(frozen=True, kw_only=True)
class TrafficRequest:
    """A split asked for by ``SetTraffic`` whose versions still load.

    Attributes:
        split: version -> percent, as asked (the shares sum to 100).
        refs: each version other than the serving one, as the registry described it.
        reason: the caller's reason, for the event.
        actor: the caller.
    """

    split: tuple[tuple[str, int], ...]
    refs: tuple[VersionRef, ...] = ()
    reason: str = ""
    actor: str = ""

    @property
    def percents(self) -> dict[str, int]:
        """The split as a dict."""
        return dict(self.split)


@dataclass(frozen=True, kw_only=True)
class DeploymentSpec:
    """What a user asks for; an empty alias and zeros in ``batching`` mean the defaults."""

    name: str
    team: str
    model_name: str
    alias: str = ""
    batching: BatchingSettings = UNSET_BATCHING
    shared_with: tuple[str, ...] = ()
    slo: Slo = UNSET_SLO
    limits: Limits = Limits()


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
        slo: when a canary is rolled back.
        limits: the data plane's admission limits.
        canaries: versions sharing the traffic with the serving version (loaded), by version.
        pending_traffic: a split asked for whose versions still load.
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
    slo: Slo = DEFAULT_SLO
    limits: Limits = Limits()
    canaries: tuple[Canary, ...] = ()
    pending_traffic: TrafficRequest | None = None
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
    def traffic(self) -> dict[str, int]:
        """Version -> percent of requests it answers now (empty when nothing serves)."""
        if not self.serving_version:
            return {}
        split = {self.serving_version: 100 - sum(c.percent for c in self.canaries)}
        split.update((c.version, c.percent) for c in self.canaries)
        return split

    def canary(self, version: str) -> Canary | None:
        """The canary of ``version``, if it is one."""
        return next((c for c in self.canaries if c.version == version), None)

    @property
    def access(self) -> DeploymentAccess:
        """Who may call it for inference."""
        return DeploymentAccess(team=self.team, shared_with=frozenset(self.shared_with))

    def changed(self, now: datetime, **changes: Any) -> Deployment:
        """A copy with ``changes`` applied, its state derived again, and ``updated_at`` = now."""
        updated = dataclasses.replace(self, updated_at=now, **changes)
        return dataclasses.replace(updated, state=state_of(updated))


@dataclass(frozen=True, kw_only=True)
class Backend:
    """One version of a deployment's split, as the inference data plane routes to it.

    Attributes:
        version: the registered model version.
        triton_model: the Triton model that serves it.
        percent: its share of requests.
    """

    version: str
    triton_model: str
    percent: int


@dataclass(frozen=True, kw_only=True)
class Split:
    """Where the inference data plane sends a deployment's requests.

    Attributes:
        deployment: the name clients use.
        backends: the versions, the serving (stable) one first.
        limits: the deployment's admission limits.
    """

    deployment: str
    backends: tuple[Backend, ...]
    limits: Limits = Limits()


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


def check_slo(slo: Slo) -> Slo:
    """An SLO with zeros replaced by the defaults, checked.

    Raises:
        InvalidArgument: naming the field out of range.
    """
    rate = slo.max_error_rate_pct or DEFAULT_SLO.max_error_rate_pct
    p99 = slo.max_p99_ms or DEFAULT_SLO.max_p99_ms
    window = slo.window_s or DEFAULT_SLO.window_s
    if not 0 < rate <= 100:
        raise InvalidArgument(
            "slo.max_error_rate_percent", f"above 0 and at most 100, got {slo.max_error_rate_pct}"
        )
    if not 0 < p99 <= MAX_SLO_P99_MS:
        raise InvalidArgument(
            "slo.max_p99_ms", f"above 0 and at most {MAX_SLO_P99_MS:g}, got {slo.max_p99_ms}"
        )
    if not 1 <= window <= MAX_SLO_WINDOW_S:
        raise InvalidArgument(
            "slo.window_seconds", f"between 1 and {MAX_SLO_WINDOW_S}, got {slo.window_s}"
        )
    return Slo(max_error_rate_pct=rate, max_p99_ms=p99, window_s=window)


def check_limits(limits: Limits) -> Limits:
    """Admission limits, checked (0 means unlimited).

    Raises:
        InvalidArgument: a limit is negative or above :data:`MAX_LIMIT`; a queue without a
            concurrency limit (nothing would ever wait).
    """
    for field, value in (
        ("limits.max_concurrency", limits.max_concurrency),
        ("limits.max_queue", limits.max_queue),
    ):
        if not 0 <= value <= MAX_LIMIT:
            raise InvalidArgument(field, f"between 0 (unlimited) and {MAX_LIMIT}, got {value}")
    if limits.max_queue and not limits.max_concurrency:
        raise InvalidArgument(
            "limits.max_queue", "needs limits.max_concurrency: requests queue for its slots"
        )
    return limits


def check_split(shares: Iterable[tuple[str, int]]) -> dict[str, int]:
    """A traffic split, checked: version -> percent, without the versions at 0%.

    Raises:
        InvalidArgument: a version that is no version number, named twice, a percent outside
            0..100, percents that do not sum to 100, or more than :data:`MAX_SPLIT_VERSIONS`
            versions.
    """
    split: dict[str, int] = {}
    for version, percent in shares:
        if not version.isdigit() or len(version) > _MAX_VERSION:
            raise InvalidArgument("traffic", f"{version[:40]!r} is no version number")
        if version in split:
            raise InvalidArgument("traffic", f"version {version} is named twice")
        if not 0 <= percent <= 100:
            raise InvalidArgument("traffic", f"v{version}: {percent}% is not between 0 and 100")
        split[version] = percent
    total = sum(split.values())
    if total != 100:
        shown = " ".join(f"v{v}={p}" for v, p in split.items()) or "nothing"
        raise InvalidArgument("traffic", f"the percents must sum to 100; {shown} sums to {total}")
    kept = {v: p for v, p in split.items() if p > 0}
    if len(kept) > MAX_SPLIT_VERSIONS:
        raise InvalidArgument(
            "traffic", f"{len(kept)} versions; a split names at most {MAX_SPLIT_VERSIONS}"
        )
    return kept


def pinned_version(d: Deployment, split: dict[str, int]) -> str | None:
    """The version a checked split pins (one version at 100%), or None for a canary split.

    Raises:
        FailedPrecondition: a split of several versions while nothing serves, or that leaves
            out the serving version (its stable version: canaries roll back to it).
    """
    if len(split) == 1:
        return next(iter(split))
    if not d.serving_version:
        raise FailedPrecondition(
            f"deployment {d.name!r} serves no version yet; a split needs its serving version "
            "to roll canaries back to (or put 100% on one version)"
        )
    if d.serving_version not in split:
        raise FailedPrecondition(
            f"the split must keep the serving version v{d.serving_version} of deployment "
            f"{d.name!r} (canaries roll back to it), or put 100% on one version"
        )
    return None


def traffic_requested(d: Deployment, request: TrafficRequest, *, at: datetime) -> Deployment:
    """The deployment once a canary split was asked for: its canaries load, then it applies."""
    return d.changed(at, pending_traffic=request)


def pinned(d: Deployment, ref: VersionRef, request: TrafficRequest, *, at: datetime) -> Deployment:
    """The deployment once ``SetTraffic`` put 100% on ``ref``: it rolls out as a promotion
    would (the request is kept for the event's reason and actor)."""
    return d.changed(
        at,
        target_version=ref.version[:_MAX_VERSION],
        target_source=ref.source[:_MAX_SOURCE],
        target_run_id=ref.run_id[:_MAX_RUN_ID],
        target_time=at,
        failed_version="",
        lookup_pending=False,
        pending_traffic=request,
        last_error="" if ref.version == d.serving_version else d.last_error,
    )


def canaries_applied(d: Deployment, canaries: tuple[Canary, ...], *, at: datetime) -> Deployment:
    """The deployment once its requested canaries are loaded and take their shares."""
    return d.changed(at, canaries=canaries, pending_traffic=None, last_error="")


def traffic_failed(d: Deployment, version: str, reason: str, *, at: datetime) -> Deployment:
    """The deployment after a requested canary could not be loaded: the split stays as it was."""
    return d.changed(at, pending_traffic=None, last_error=f"v{version}: {reason}"[:MAX_REASON])


def rolled_back(d: Deployment, *, at: datetime) -> Deployment:
    """The deployment after its canaries were rolled back: the serving version takes it all."""
    return d.changed(at, canaries=(), pending_traffic=None)


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
        slo=check_slo(spec.slo),
        limits=check_limits(spec.limits),
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
        slo=spec.slo,
        limits=spec.limits,
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
    """The deployment once ``version`` answers all its traffic (a rollout replaces the split)."""
    return d.changed(
        at,
        serving_version=version,
        serving_io=io,
        canaries=(),
        pending_traffic=None,
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
    pending = d.pending_traffic
    if pending is not None and pending.percents == {version: 100}:
        changes["pending_traffic"] = None  # the pin failed: nothing is pending any more
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
    return d.changed(at, serving_version="", serving_io=None, canaries=())


def engine_down(d: Deployment, reason: str) -> Deployment:
    """How a deployment shows while the serving engine is down: UNAVAILABLE with the reason,
    if it serves (or loads) a version; a deployment that waits for a version, or whose target
    failed, shows as it is. Not stored: once the engine is back the stored state shows again."""
    if not d.serving_version and d.state is not DeploymentState.LOADING:
        return d
    return dataclasses.replace(d, state=DeploymentState.UNAVAILABLE, last_error=reason[:MAX_REASON])
