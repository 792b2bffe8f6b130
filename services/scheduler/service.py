"""Scheduler use cases: submission, queries, cancellation, the queues (their configuration and
what anyone may read of them), the dispatcher that admits, preempts, retries and stops jobs, and
recovery after a restart.

Imports neither grpc, nor nats, nor SQLAlchemy: jobs are :mod:`services.scheduler.domain` types,
the store is reached through the :class:`JobStore` unit of work, processes through the
:class:`~services.scheduler.executor.Executor`, admission decisions come from the pure
:class:`~services.scheduler.queueing.engine.QueueEngine`.

One dispatch pass: load the queued and active jobs and the configuration in force, stop the jobs
past their maximum run time, hand the engine every admission (active jobs) and workload (queued
jobs), run its cycle, then preempt the victims it chose (SIGTERM, a grace period, SIGKILL) and
admit and launch what it admitted. A preempted job goes back to its queue at its place (its
``queue_order``, the submission time, is kept); a failed one is retried after a backoff within
the budget of its failure kind, queued by its retry time.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
import dataclasses
import logging
import math
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import yaml
from opentelemetry import trace
from opentelemetry.trace import Span
from tenacity import AsyncRetrying, before_sleep_log, stop_after_attempt, wait_random_exponential

from plinth_common.auth import Principal, require, require_admin
from plinth_common.auth.permissions import (
    JOBS_CANCEL,
    JOBS_READ,
    JOBS_SUBMIT,
    QUEUES_APPLY,
    QUEUES_CONFIG_READ,
    QUEUES_READ,
    Permission,
)
from plinth_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PlinthError,
    Unavailable,
)
from plinth_common.events.tracing import extract, inject, traceparent_of_current
from plinth_common.metrics import Metrics
from plinth_common.names import check_team, shown
from plinth_common.paging import PageRequest
from services.scheduler.credentials import (
    CREDENTIAL_ENV,
    NoCredentials,
    TeamCredentials,
    TeamCredentialsSource,
)
from services.scheduler.domain import (
    ACTIVE,
    CANCELLED_BEFORE_START,
    LOST,
    Attempt,
    EndReason,
    ExitStatus,
    FailureKind,
    Job,
    JobEvent,
    JobEventKind,
    JobSpec,
    JobState,
    Outcome,
    PendingInfo,
    StoredQueueConfig,
    Verdict,
    format_bytes,
    judge,
    validate_spec,
)
from services.scheduler.executor import Executor, RunHandle
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.queueing.config import config_to_document, default_config, parse_config
from services.scheduler.queueing.engine import Decisions, Preemption, QueueEngine, preemptor_of
from services.scheduler.queueing.model import Admission, ClusterQueue, QueueConfig, Workload
from services.scheduler.queueing.report import QueueReport

log = logging.getLogger(__name__)
tracer = trace.get_tracer("plinth.scheduler")

PAGE_KIND = "jobs"
LOG_POLL_S = 0.2
DISPATCH_INTERVAL_S = 2.0
STOP_GRACE_S = 15.0
#: SIGTERM to SIGKILL for a preempted job (``PLINTH_SCHEDULER_PREEMPTION_GRACE_S``).
PREEMPTION_GRACE_S = 30.0
#: How stale the queue report that GetQueue and GetJob read may be.
REPORT_TTL_S = 0.5
#: Expected run time without a declared maximum: the median of this many recent successes.
HISTORY_RUNS = 20
HISTORY_TTL_S = 30.0
#: The queued rows are read again at least this often, whatever this process wrote.
ROWS_REFRESH_S = 30.0
#: How often the metrics' gauges (pending jobs, quota usage) are set from the queue report.
METRICS_INTERVAL_S = 5.0
#: After an executor's engine was unreachable, nothing is launched on its flavor for this long,
#: doubling per failure in a row up to the maximum (an engine that is down is not hammered).
EXECUTOR_BACKOFF_S = 1.0
EXECUTOR_BACKOFF_MAX_S = 60.0
#: A launch that fails with one of these is the job's own doing (no such program, no access).
_USER_LAUNCH_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


class JobTransaction(Protocol):
    """One unit of work: job changes and their events commit together, or not at all."""

    async def get(self, job_id: str) -> Job | None:
        """The job as of this transaction (locked for it where the database can)."""
        ...

    async def add(self, job: Job) -> Job:
        """Stores a new job; returns it as stored."""
        ...

    async def replace(self, job: Job, *, expect: JobState) -> Job | None:
        """Stores ``job`` if the stored one is still in ``expect``; None if it moved on."""
        ...

    async def emit(self, event: JobEvent) -> None:
        """Records a life-cycle event, published after the commit."""
        ...

    async def add_attempt(self, job_id: str, attempt: Attempt) -> None:
        """Records a finished attempt of the job."""
        ...


class JobStore(Protocol):
    """Where jobs and queue configurations are kept: reads, and write transactions."""

    def transaction(self) -> AbstractAsyncContextManager[JobTransaction]:
        """A unit of work, committed when the ``async with`` block ends without error."""
        ...

    async def get(self, job_id: str) -> Job | None:
        """The job (with its finished attempts), or None."""
        ...

    async def page(
        self,
        *,
        teams: Collection[str] | None,
        state: JobState | None,
        limit: int,
        before_seq: int | None,
    ) -> list[Job]:
        """Jobs newest first of ``teams`` (None: any team) in ``state`` (None: any), older than
        ``before_seq``."""
        ...

    async def in_states(self, states: Sequence[JobState]) -> list[Job]:
        """Jobs in any of ``states``, oldest first (without their finished attempts)."""
        ...

    async def queued_index(self) -> dict[str, int]:
        """The queued jobs' ids and attempt numbers."""
        ...

    async def by_ids(self, job_ids: Collection[str]) -> list[Job]:
        """The jobs with these ids, by submission order (without their finished attempts)."""
        ...

    async def run_seconds(
        self, keys: Collection[tuple[str, str]], *, limit: int
    ) -> dict[tuple[str, str], list[float]]:
        """Run times of each ``(team, name)``'s last ``limit`` succeeded jobs, newest first."""
        ...

    async def latest_queue_config(self) -> StoredQueueConfig | None:
        """The configuration in force, None if none was ever applied."""
        ...

    async def add_queue_config(
        self, document: Mapping[str, Any], *, applied_by: str, applied_at: datetime
    ) -> StoredQueueConfig:
        """Stores a new configuration; returns it with its version."""
        ...


@dataclass(frozen=True, kw_only=True)
class JobEnvironment:
    """What the scheduler injects into every job's environment.

    Attributes:
        mlflow_tracking_uri: the registry's MLflow, so a job's run lands in the platform.
        base: variables every job inherits (PATH, HOME, OTEL_* ...).
    """

    mlflow_tracking_uri: str
    base: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class QueueConfigView:
    """A queue configuration as GetQueueConfig and ApplyQueueConfig answer it.

    Attributes:
        version: 0 for the built-in default (nothing applied yet).
        document: canonical YAML (what ``plinth admin queues apply`` takes back).
        warnings: what the admin should know (admitted jobs above a lowered quota keep running).
    """

    version: int
    document: str
    applied_at: datetime | None
    applied_by: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class QueueView:
    """What one caller may see of the queues.

    Attributes:
        report: the engine's report, cut to the caller's queues and their teams' pending
            workloads (another team's jobs in a shared queue count in the queue's ``pending``
            and in positions, but are not listed).
        jobs: the listed pending jobs by id (names and priority classes for display).
    """

    report: QueueReport
    jobs: Mapping[str, Job]


def _now() -> datetime:
    return datetime.now(UTC)


def _seconds(value: float) -> str:
    return f"{value:g} s"


class SchedulerService:
    """Jobs: submission, queries, cancellation, the queues, and the dispatcher that runs them.

    Every query and command takes the verified caller (``principal``) and checks it against the
    job's team: another team's job answers NOT_FOUND, exactly as a missing id does.

    Args:
        store: where jobs (and their events) are kept.
        executor: where job processes run.
        job_env: what every job's environment carries.
        credentials: each team's MLflow user, injected into its jobs (none by default).
        stop_jobs_on_shutdown: kill running jobs on :meth:`stop` (else they keep running and a
            restarted scheduler re-attaches them).
        finish_attempts: how often recording a job's outcome is tried before giving up (a
            restart then recovers it from the executor).
        preemption_grace_s: SIGTERM to SIGKILL for a preempted job.
        clock: the current time (tests move it).
        check_config: further checks of a configuration before it is applied (raises
            InvalidArgument, e.g. a flavor naming an executor this scheduler cannot build).
        on_config: told of every configuration put in force (at start and on apply), e.g. to
            build the executors of its flavors.
        metrics: where its metrics are recorded (a private registry when omitted).
        metrics_interval_s: how often the gauges are set from the queue report.

    Faults of an executor's engine: one that cannot be reached at launch (``Unavailable``)
    leaves the job queued with the reason ``executor <kind> unreachable: <cause>``, and its
    flavor gets nothing launched for a backoff that doubles while it stays down (other flavors
    go on); one that refuses the job (``FailedPrecondition``: an unknown partition, an invalid
    image) fails it at once with the engine's words, without a retry.
    """

    def __init__(
        self,
        *,
        store: JobStore,
        executor: Executor,
        job_env: JobEnvironment,
        credentials: TeamCredentialsSource | None = None,
        stop_jobs_on_shutdown: bool = False,
        finish_attempts: int = 8,
        preemption_grace_s: float = PREEMPTION_GRACE_S,
        clock: Callable[[], datetime] = _now,
        check_config: Callable[[QueueConfig], None] | None = None,
        on_config: Callable[[QueueConfig], None] | None = None,
        metrics: SchedulerMetrics | None = None,
        metrics_interval_s: float = METRICS_INTERVAL_S,
    ) -> None:
        self._store = store
        self._executor = executor
        self._job_env = job_env
        self._credentials = credentials or NoCredentials()
        self._stop_jobs_on_shutdown = stop_jobs_on_shutdown
        self._finish_attempts = finish_attempts
        self._preemption_grace_s = preemption_grace_s
        self._clock = clock
        self._check_config = check_config
        self._on_config = on_config
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._run_spans: dict[str, Span] = {}
        # The configuration in force and the engine holding the last pass's state (plus the
        # submissions and cancellations since), which reports are read from.
        self._config: QueueConfig | None = None
        self._config_record: StoredQueueConfig | None = None
        self._engine: QueueEngine | None = None
        self._queued: dict[str, Job] = {}
        self._queued_rows: dict[str, Job] = {}
        self._queued_sorted: builtins.list[Job] = []
        self._backoffs: builtins.list[datetime] = []
        # Writes committed by this service, and the count the queued rows were read at: an
        # idle pass (nothing written since) reads no rows at all.
        self._writes = 0
        self._writes_read = -1
        self._rows_read_at = -math.inf
        # The engine whose state was last loaded from the store (a new configuration builds a
        # new engine, which needs loading, whoever gets to it first), and the lock that keeps
        # a load and a cycle from interleaving (a report's load and a pass's).
        self._synced_engine: QueueEngine | None = None
        self._engine_lock = asyncio.Lock()
        self._report: tuple[float, QueueReport] | None = None
        self._report_lock = asyncio.Lock()
        self._history: dict[tuple[str, str], tuple[float, list[float]]] = {}
        self._next_due: datetime | None = None
        self._metrics = metrics or SchedulerMetrics(Metrics("scheduler"))
        self._metrics_interval_s = metrics_interval_s
        self._metrics_at = -math.inf
        # Flavors whose engine could not be reached, and the queued jobs it holds back (job id
        # -> the flavor and the reason they show while they wait).
        self._down: dict[str, _Down] = {}
        self._held_back: dict[str, tuple[str, str]] = {}

    # -- queries and commands -------------------------------------------------------------

    async def submit(self, principal: Principal, spec: JobSpec) -> Job:
        """Validates and queues a job of ``spec.team`` in its team's queue; emits
        ``job.submitted``.

        Raises:
            InvalidArgument: naming the first field of ``spec`` that is wrong: also a team in no
                queue (``spec.team``), an unknown priority class (``spec.priority``), and a
                request no flavor of the queue could ever hold (``spec.resources.*``,
                ``spec.replicas``).
            NotFound: the caller is no member of the team (kind ``team``).
            PermissionDenied: the caller's role in the team is below developer.
        """
        check_team(spec.team, "spec.team")
        require(principal, JOBS_SUBMIT, spec.team, kind="team", name=spec.team)
        spec = validate_spec(spec)
        engine, config = await self._queues()
        queue = engine.queue_of(spec.team)
        priority = spec.priority or queue.default_priority
        priority_class = config.priority_classes.get(priority)
        if priority_class is None:
            known = ", ".join(sorted(config.priority_classes)) or "none"
            raise InvalidArgument(
                "spec.priority", f"unknown priority class {shown(priority)} (known: {known})"
            )
        if spec.working_dir and not self._executor.has_directory(spec.working_dir):
            raise InvalidArgument(
                "spec.working_dir", f"no such directory: {shown(spec.working_dir)}"
            )
        job_id = f"j-{uuid.uuid4().hex[:12]}"
        now = self._clock()
        job = Job(
            id=job_id,
            spec=dataclasses.replace(spec, priority=priority),
            state=JobState.QUEUED,
            created_at=now,
            traceparent=traceparent_of_current().get("traceparent", ""),
            queue=queue.name,
            priority=priority,
            priority_value=priority_class.value,
            queue_order=now.timestamp(),
            queued_at=now,
        )
        workload = self._workload(job, queue.name, priority_class.value, None, "")
        engine.check_satisfiable(workload)
        if not spec.working_dir:
            job = dataclasses.replace(
                job, spec=dataclasses.replace(job.spec, working_dir=self._executor.prepare(job_id))
            )
        async with self._transaction() as tx:
            job = await tx.add(job)
            await tx.emit(JobEvent(kind=JobEventKind.SUBMITTED, job=job))
        # The dispatcher's next pass (now) hands it to the engine, with the history of every
        # job submitted meanwhile read in one query.
        self._wake.set()
        return job

    async def get(self, principal: Principal, job_id: str) -> Job:
        """The job; a queued one with its position, pending reason and estimated start.

        Raises:
            NotFound: no such job, or one of a team the caller is no member of.
        """
        job = self._checked(principal, JOBS_READ, await self._store.get(job_id), job_id)
        return (await self._with_pending([job]))[0]

    @staticmethod
    def _checked(principal: Principal, permission: Permission, job: Job | None, job_id: str) -> Job:
        if job is None:
            raise NotFound("job", job_id)
        require(principal, permission, job.team, kind="job", name=job_id)
        return job

    async def _load(self, job_id: str) -> Job:
        job = await self._store.get(job_id)
        if job is None:
            raise NotFound("job", job_id)
        return job

    async def list(
        self,
        principal: Principal,
        *,
        team: str = "",
        state: JobState | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Job], str]:
        """A page of jobs, newest first, and the token of the next page ('' at the end).

        Without ``team``, the jobs of every team the caller sees (admins: all).

        Raises:
            NotFound: ``team`` is one the caller is no member of (kind ``team``).
        """
        teams: Collection[str] | None
        if team:
            check_team(team)
            require(principal, JOBS_READ, team, kind="team", name=team)
            teams = {team}
        else:
            teams = principal.visible_teams()
        page = PageRequest.parse(page_size, page_token, kind=PAGE_KIND)
        if teams is not None and not teams:
            return [], ""
        rows = await self._store.page(
            teams=teams, state=state, limit=page.fetch_limit, before_seq=page.before
        )
        jobs, token = page.cut(rows, seq=lambda job: job.seq)
        return await self._with_pending(jobs), token

    async def cancel(self, principal: Principal, job_id: str) -> Job:
        """Cancels a queued job at once, or stops an active one (it ends CANCELLED).

        Raises:
            NotFound: no such job, or one of a team the caller is no member of.
            PermissionDenied: the caller's role in the job's team is below developer.
            FailedPrecondition: the job has already ended.
        """
        cancelled: Job | None = None
        async with self._transaction() as tx:
            job = self._checked(principal, JOBS_CANCEL, await tx.get(job_id), job_id)
            if job.state.terminal:
                raise FailedPrecondition(
                    f"job {job_id} has already ended ({job.state.value})",
                    job_id=job_id,
                    state=job.state.value,
                )
            if job.state is JobState.QUEUED:
                cancelled = await tx.replace(job.cancel_queued(now=self._clock()), expect=job.state)
                if cancelled is not None:
                    await tx.emit(
                        JobEvent(
                            kind=JobEventKind.CANCELLED,
                            job=cancelled,
                            reason=cancelled.failure_reason,
                        )
                    )
                else:
                    # Admitted meanwhile: it is stopped like any active job below.
                    job = await tx.get(job_id) or job
            if job.state.active:
                job = await tx.replace(job.request_cancel(), expect=job.state) or job
        if cancelled is not None:
            # Only once committed: a rolled-back cancel leaves the job queued, and in the engine.
            self._forget(job_id)
            return cancelled
        # Outside the transaction: stopping a process may be a remote call.
        await self._executor.terminate(job)
        return job

    async def logs(
        self, principal: Principal, job_id: str, *, follow: bool
    ) -> AsyncIterator[bytes]:
        """The job's combined stdout and stderr; with ``follow``, until the job ends.

        Raises:
            NotFound: no such job, or one of a team the caller is no member of.
        """
        job = await self.get(principal, job_id)
        offset = 0
        while True:
            chunk = await self._executor.read_log(job_id, offset)
            if chunk:
                offset += len(chunk)
                yield chunk
                continue
            if not follow or job.state.terminal:
                return
            await asyncio.sleep(LOG_POLL_S)
            job = await self._load(job_id)

    # -- the queues -------------------------------------------------------------------------

    async def queue_status(self, principal: Principal, *, team: str = "") -> QueueView:
        """The queues the caller may see, with usage against quota, and their pending jobs.

        A member (any role) sees the cluster queues of their teams and their teams' pending
        jobs; another team's jobs in a shared queue are counted (``pending``, and the positions
        they take) but not named. Admins see everything. The report is at most
        :data:`REPORT_TTL_S` old.

        Raises:
            NotFound: ``team`` is one the caller is no member of (kind ``team``).
        """
        teams: Collection[str] | None
        if team:
            check_team(team)
            require(principal, QUEUES_READ, team, kind="team", name=team)
            teams = {team}
        else:
            teams = principal.visible_teams()
        report = await self._current_report()
        engine, _ = await self._queues()
        if teams is not None:
            names = set()
            for t in teams:
                with suppress(InvalidArgument):
                    names.add(engine.queue_of(t).name)
            report = dataclasses.replace(
                report,
                queues=tuple(q for q in report.queues if q.name in names),
                pending=tuple(p for p in report.pending if p.team in teams),
            )
        jobs = {
            p.job_id: self._queued[p.job_id] for p in report.pending if p.job_id in self._queued
        }
        return QueueView(report=report, jobs=jobs)

    async def queue_config(self, principal: Principal) -> QueueConfigView:
        """The configuration in force (the built-in default, version 0, if none was applied).

        Raises:
            PermissionDenied: the caller is no admin.
        """
        require_admin(principal, QUEUES_CONFIG_READ)
        _, config = await self._queues()
        record = self._config_record
        return QueueConfigView(
            version=config.version,
            document=_to_yaml(config_to_document(config)),
            applied_at=record.applied_at if record else None,
            applied_by=record.applied_by if record else "",
        )

    async def apply_queue_config(
        self, principal: Principal, document: str, *, dry_run: bool = False
    ) -> QueueConfigView:
        """Validates ``document`` (YAML or JSON) as a whole and, unless ``dry_run``, puts it in
        force at once.

        Applied live: the next dispatch pass admits against the new quotas. Jobs already
        admitted keep running even where a new quota is lower than what they hold (the warnings
        say where); queued jobs of a team the new configuration puts in no queue stay queued
        until one takes it (a warning names them).

        Raises:
            PermissionDenied: the caller is no admin.
            InvalidArgument: the document is not YAML, or refused: one violation per problem
                (the previous configuration stays in force).
        """
        require_admin(principal, QUEUES_APPLY)
        loaded = _load_document(document)
        _, current = await self._queues()
        config = parse_config(loaded, version=current.version + 1)
        if self._check_config is not None:
            self._check_config(config)
        canonical = config_to_document(config)
        warnings = tuple(await self._config_warnings(config))
        if dry_run:
            return QueueConfigView(
                version=current.version,
                document=_to_yaml(canonical),
                applied_at=None,
                applied_by="",
                warnings=warnings,
            )
        record = await self._store.add_queue_config(
            canonical, applied_by=principal.name, applied_at=self._clock()
        )
        self._use_config(parse_config(record.document, version=record.version), record)
        log.info("queue configuration %d applied by %s", record.version, principal.name)
        self._wake.set()
        return QueueConfigView(
            version=record.version,
            document=_to_yaml(canonical),
            applied_at=record.applied_at,
            applied_by=record.applied_by,
            warnings=warnings,
        )

    async def _config_warnings(self, config: QueueConfig) -> builtins.list[str]:
        jobs = await self._store.in_states([JobState.QUEUED, *ACTIVE])
        engine = QueueEngine(config)
        warnings: builtins.list[str] = []
        held: dict[tuple[str, str, str], float] = {}
        homeless: dict[str, int] = {}
        orphans: dict[str, int] = {}  # a dropped flavor -> its active jobs
        for job in jobs:
            if job.state.active and job.flavor and job.flavor not in config.flavors:
                orphans[job.flavor] = orphans.get(job.flavor, 0) + 1
            try:
                queue = engine.queue_of(job.team)
            except InvalidArgument:
                if job.state is JobState.QUEUED:
                    homeless[job.team] = homeless.get(job.team, 0) + 1
                continue
            if job.state.active:
                for resource, amount in _request(job).items():
                    key = (queue.name, job.flavor, resource)
                    held[key] = held.get(key, 0.0) + amount * job.spec.replicas
        for (queue_name, flavor, resource), amount in sorted(held.items()):
            queue = config.cluster_queues[queue_name]
            quota = next(
                (f.resources.get(resource) for f in queue.flavors if f.flavor == flavor), None
            )
            nominal = quota.nominal if quota is not None else 0.0
            if amount > nominal + 1e-9:
                warnings.append(
                    f"queue {queue_name}: admitted jobs hold {_amount(resource, amount)} of "
                    f"flavor {flavor or '?'}, above its new nominal {_amount(resource, nominal)}; "
                    "they keep running, and the queue admits nothing more there until they end"
                )
        for flavor, count in sorted(orphans.items()):
            warnings.append(
                f"flavor {flavor} is dropped while {count} admitted job(s) hold it: they keep "
                "running on its executor until they end (cancel them to stop them sooner)"
            )
        for team, count in sorted(homeless.items()):
            warnings.append(
                f"team {team} is in no queue and there is no default queue: its {count} queued "
                "job(s) stay queued until a queue takes the team"
            )
        return warnings

    async def _queues(self) -> tuple[QueueEngine, QueueConfig]:
        """The engine and the configuration in force (loaded from the store the first time)."""
        if self._engine is None or self._config is None:
            record = await self._store.latest_queue_config()
            if record is None:
                config = default_config(_capacity_of(self._executor))
            else:
                config = parse_config(record.document, version=record.version)
            if self._engine is None or self._config is None:  # no other caller got there first
                self._use_config(config, record)
        assert self._engine is not None and self._config is not None
        return self._engine, self._config

    def _use_config(self, config: QueueConfig, record: StoredQueueConfig | None) -> None:
        self._config = config
        self._config_record = record
        self._engine = QueueEngine(config)
        self._synced_engine = None
        self._writes += 1  # the next pass reads the queued rows for the new engine
        self._report = None
        if self._on_config is not None:
            self._on_config(config)

    def _forget(self, job_id: str) -> None:
        self._queued.pop(job_id, None)
        if self._engine is not None:
            self._engine.remove(job_id)

    async def _current_report(self) -> QueueReport:
        """The engine's report, recomputed at most every :data:`REPORT_TTL_S` (a GetQueue per
        second over 10,000 pending jobs must not rebuild it per call)."""
        cached = self._report
        if cached is not None and time.monotonic() - cached[0] < REPORT_TTL_S:
            return cached[1]
        async with self._report_lock:
            cached = self._report
            if cached is not None and time.monotonic() - cached[0] < REPORT_TTL_S:
                return cached[1]
            engine, _ = await self._queues()
            async with self._engine_lock:
                if self._synced_engine is not engine:
                    # Nothing dispatched yet with this configuration: read the queues from the
                    # store.
                    await self._sync_engine(
                        engine, await self._store.in_states([JobState.QUEUED, *ACTIVE])
                    )
                report = engine.report(self._clock())
            self._report = (time.monotonic(), report)
            return report

    async def _with_pending(self, jobs: Sequence[Job]) -> builtins.list[Job]:
        if not any(job.state is JobState.QUEUED for job in jobs):
            return list(jobs)
        report = await self._current_report()
        by_id = {p.job_id: p for p in report.pending}
        out: builtins.list[Job] = []
        for job in jobs:
            entry = by_id.get(job.id) if job.state is JobState.QUEUED else None
            if entry is None:
                out.append(job)
                continue
            out.append(
                dataclasses.replace(
                    job,
                    pending=PendingInfo(
                        position_in_queue=entry.position_in_queue,
                        position_in_cohort=entry.position_in_cohort,
                        reason=self._held_back.get(job.id, ("", entry.reason))[1],
                        estimated_start=entry.estimated_start,
                        estimate_basis=entry.estimate_basis,
                    ),
                )
            )
        return out

    # -- workloads --------------------------------------------------------------------------

    def _workload(
        self,
        job: Job,
        queue: str,
        priority: int,
        expected_runtime_s: float | None,
        basis: str,
        bound: float | None = None,
    ) -> Workload:
        return Workload(
            id=job.id,
            team=job.team,
            queue=queue,
            priority=priority,
            request=_request(job),
            replicas=job.spec.replicas,
            # Rows from before queues had no order: their submission time is it.
            order=job.queue_order or job.created_at.timestamp(),
            expected_runtime_s=expected_runtime_s,
            runtime_basis=basis,
            not_before=job.not_before,
            runtime_bound_s=bound,
        )

    async def _workload_of(self, job: Job, config: QueueConfig) -> Workload:
        """The job as admission sees it under ``config`` (its team's queue now, its priority
        class's value now, its expected run time). An active job counts in the queue that
        admitted it while that queue exists (the team may have moved since)."""
        assert self._engine is not None
        if job.state.active and job.queue and job.queue in config.cluster_queues:
            queue = job.queue
        else:
            try:
                queue = self._engine.queue_of(job.team).name
            except InvalidArgument:
                queue = job.queue  # the team lost its queue: the engine reports it as such
        priority_class = config.priority_classes.get(job.priority)
        priority = priority_class.value if priority_class is not None else job.priority_value
        expected, basis, bound = await self._expected_runtime(job)
        return self._workload(job, queue, priority, expected, basis, bound)

    async def _expected_runtime(self, job: Job) -> tuple[float | None, str, float | None]:
        """The declared maximum run time, else the median of the team's recent successes of
        jobs with the same name; None when neither exists. With it the bound backfill goes by:
        the declared maximum (enforced), else the longest of those runs (a median would let a
        job that runs long delay the head it was backfilled ahead of)."""
        if job.spec.max_run_time_s:
            declared = job.spec.max_run_time_s
            return declared, "declared maximum run time", declared
        await self._fetch_history([job])
        runs = self._history[(job.team, job.name)][1]
        if not runs:
            return None, "", None
        median = statistics.median(runs)
        return median, f"median of the last {len(runs)} runs of {job.name}", max(runs)

    async def _fetch_history(self, jobs: Collection[Job]) -> None:
        """Fills the history cache for the jobs without a declared run time, in one query."""
        now = time.monotonic()
        keys = {(job.team, job.name) for job in jobs if not job.spec.max_run_time_s}
        stale = {
            key
            for key in keys
            if key not in self._history or now - self._history[key][0] > HISTORY_TTL_S
        }
        if stale:
            found = await self._store.run_seconds(stale, limit=HISTORY_RUNS)
            for key in stale:
                self._history[key] = (now, found.get(key, []))

    async def _sync_engine(self, engine: QueueEngine, jobs: Sequence[Job]) -> None:
        """Brings the engine's state in line with ``jobs`` (all queued and active ones).

        The engine is incremental and remembers which victims are being preempted for whom, so
        it is only reloaded as a whole after a restart or a new configuration (or when it holds
        less than the store says is active); otherwise ended jobs are removed, and jobs queued
        since (submitted, requeued, retried, not launched after all) are added.
        """
        assert self._config is not None
        active = {job.id: job for job in jobs if job.state.active}
        queued = {job.id: job for job in jobs if job.state is JobState.QUEUED}
        self._queued = queued
        held = {a.workload.id for a in engine.admitted()}
        if self._synced_engine is not engine or not set(active) <= held:
            await self._fetch_history(jobs)
            admitted: builtins.list[Admission] = []
            for job in active.values():
                workload = await self._workload_of(job, self._config)
                admitted.append(
                    Admission(
                        workload=workload,
                        flavor=job.flavor or _first_flavor(self._config, workload.queue),
                        admitted_at=job.admitted_at or job.created_at,
                    )
                )
            pending = [await self._workload_of(job, self._config) for job in queued.values()]
            # Preemptions under way stay so: their victims are not chosen again (nor more).
            stopping = {
                job.id: preemptor_of(job.stop_message)
                for job in active.values()
                if job.stop_reason is EndReason.PREEMPTED
            }
            engine.load(admitted=admitted, pending=pending, stopping=stopping)
            self._synced_engine = engine
            return
        for job_id in held - set(active):
            engine.remove(job_id)  # ended, requeued, or admitted by the engine but not launched
        waiting = set(engine.pending_ids())
        for job_id in waiting - set(queued):
            engine.remove(job_id)  # cancelled
        arrived = [queued[job_id] for job_id in set(queued) - waiting]
        await self._fetch_history(arrived)
        for job in arrived:
            engine.add_pending(await self._workload_of(job, self._config))

    # -- the dispatcher ---------------------------------------------------------------------

    async def start(self) -> None:
        """Re-attaches jobs left by a previous run, then starts dispatching."""
        await self._queues()
        await self.recover()
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="dispatcher")

    async def stop(self) -> None:
        """Stops dispatching; running jobs are killed only if so configured."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._stop_jobs_on_shutdown:
            for job in await self._store.in_states(ACTIVE):
                await self._executor.terminate(job)
            if self._watchers:
                await asyncio.wait(list(self._watchers.values()), timeout=STOP_GRACE_S)
        # The rest keep running; a restarted scheduler re-attaches them.
        watchers = list(self._watchers.values())
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        self._watchers.clear()
        for span in self._run_spans.values():
            span.end()
        self._run_spans.clear()

    async def wait_idle(self) -> None:
        """Waits until the outcome of every watched job is recorded."""
        while self._watchers:
            await asyncio.gather(*list(self._watchers.values()), return_exceptions=True)

    async def _dispatch_forever(self) -> None:
        # Not a retry: the dispatcher runs on every wake-up and every few seconds regardless,
        # and sooner when a maximum run time or a retry's backoff ends before then.
        while True:
            try:
                await self.dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatch failed")
            timeout = DISPATCH_INTERVAL_S
            if self._next_due is not None:
                until = (self._next_due - self._clock()).total_seconds()
                timeout = min(timeout, max(0.05, until))
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            self._wake.clear()

    async def dispatch_once(self) -> int:
        """One pass: stops jobs past their maximum run time, runs the admission engine's cycle,
        preempts its victims, and admits and launches what it admitted; returns how many
        started.

        A job whose team's MLflow credentials cannot be obtained now stays queued (the next
        pass tries again); one whose credentials are refused fails with the reason.
        """
        now = self._clock()
        engine, _ = await self._queues()
        jobs, read = await self._pass_jobs()
        await self._enforce_run_times([job for job in jobs if job.state.active], now)
        async with self._engine_lock:
            engine, _ = await self._queues()  # a configuration may have been applied meanwhile
            if read or self._synced_engine is not engine:
                await self._sync_engine(engine, jobs)
            decisions: Decisions = engine.cycle(now)
        if decisions.admit or decisions.preempt:
            # A pass that changed the queues drops the cached report (passes are sequential,
            # so this rebuilds it at most once a pass; a pass that admits nothing keeps it).
            self._report = None
        active = [job for job in jobs if job.state.active]
        self._next_due = self._due(active, now, read=read)
        by_id = {**self._queued_rows, **{job.id: job for job in active}}
        for preemption in decisions.preempt:
            await self._preempt(preemption, by_id.get(preemption.victim.workload.id))
        started = 0
        # Teams whose credentials failed in this pass: their other jobs do not ask again.
        unavailable: set[str] = set()
        clock = time.monotonic()
        for admission in decisions.admit:
            job = by_id.get(admission.workload.id)
            if job is None or job.team in unavailable:
                continue
            down = self._down.get(admission.flavor)
            if down is not None and clock < down.until:
                # Its engine is down: the job waits (and says why) without a launch attempt.
                await self._hold_back(job, admission.flavor, down.reason)
                continue
            credentials = await self._credentials_for(job)
            if isinstance(credentials, Unavailable):
                unavailable.add(job.team)
                self._writes += 1  # the engine counts it admitted: the next pass corrects it
                continue
            self._queued.pop(job.id, None)
            if await self._admit_and_launch(
                job, credentials, flavor=admission.flavor, queue=admission.workload.queue
            ):
                started += 1
        await self._record_gauges()
        return started

    async def _record_gauges(self) -> None:
        """Sets the pending and quota gauges from the report, at most every interval."""
        clock = time.monotonic()
        if not self._metrics.enabled or clock - self._metrics_at < self._metrics_interval_s:
            return
        self._metrics_at = clock
        self._held_back = {i: h for i, h in self._held_back.items() if i in self._queued_rows}
        overrides = {i: reason for i, (_, reason) in self._held_back.items()}
        cached = self._report
        self._metrics.report(await self._current_report(), overrides)
        if cached is None:
            # Built for the gauges alone: readers get one that includes what comes next.
            self._report = None

    def _executor_kinds(self) -> dict[str, str]:
        """Flavor name -> the kind of executor it runs on, under the configuration in force."""
        if self._config is None:
            return {}
        return {name: f.executor or "local" for name, f in self._config.flavors.items()}

    def _executor_kind(self, flavor: str) -> str:
        return self._executor_kinds().get(flavor, "local") if flavor else "local"

    def _engine_down(self, job: Job, exc: Unavailable) -> str:
        """Notes that the job's flavor's engine is unreachable; returns the reason it shows."""
        kind = self._executor_kind(job.flavor)
        reason = exc.message
        if not reason.startswith(f"executor {kind} unreachable"):
            reason = f"executor {kind} unreachable: {reason}"
        previous = self._down.get(job.flavor)
        failures = previous.failures + 1 if previous is not None else 1
        backoff = min(EXECUTOR_BACKOFF_MAX_S, EXECUTOR_BACKOFF_S * 2 ** (failures - 1))
        self._down[job.flavor] = _Down(
            reason=reason, until=time.monotonic() + backoff, failures=failures
        )
        return reason

    async def _hold_back(self, job: Job, flavor: str, reason: str) -> None:
        """Puts a job the engine admitted back among its pending ones (its executor's engine
        is down), so that reports show it waiting, with ``reason``."""
        self._held_back[job.id] = (flavor, reason)
        if self._engine is not None and self._config is not None:
            self._engine.remove(job.id)
            self._engine.add_pending(await self._workload_of(job, self._config))
        self._report = None

    def _engine_up(self, flavor: str) -> None:
        """A launch on the flavor succeeded: its jobs no longer wait for the engine."""
        if self._down.pop(flavor, None) is not None:
            self._held_back = {i: h for i, h in self._held_back.items() if h[0] != flavor}

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[JobTransaction]:
        """A unit of work of the store, counted once it has ended (see :meth:`_pass_jobs`)."""
        try:
            async with self._store.transaction() as tx:
                recorder = _Recorder(tx)
                yield recorder
            # Committed: only now are its events counted.
            if recorder.events:
                self._metrics.committed(recorder.events, self._executor_kinds())
        finally:
            self._writes += 1

    async def _pass_jobs(self) -> tuple[builtins.list[Job], bool]:
        """The active jobs, read afresh, and the queued ones: their ids only when something
        was written since the last read (or every :data:`ROWS_REFRESH_S` regardless), their
        rows only when new to this process or back for another attempt. With 10,000 waiting,
        reading every row each pass would be most of the pass.

        Returns:
            The jobs, and whether the queued ones were read (else nothing changed since).
        """
        active = await self._store.in_states(ACTIVE)
        now = time.monotonic()
        if self._writes == self._writes_read and now - self._rows_read_at < ROWS_REFRESH_S:
            # The active rows are the later read here: a job in both was admitted since.
            ids = {job.id for job in active}
            return [*active, *(j for j in self._queued_sorted if j.id not in ids)], False
        writes = self._writes  # a write that ends during the read makes the next pass read
        index = await self._store.queued_index()
        self._writes_read, self._rows_read_at = writes, now
        cache = self._queued_rows
        fresh = [i for i, attempt in index.items() if i not in cache or cache[i].attempt != attempt]
        for job in await self._store.by_ids(fresh):
            cache[job.id] = job
        self._queued_rows = {i: cache[i] for i in index if i in cache}
        self._queued_sorted = sorted(self._queued_rows.values(), key=lambda job: job.seq)
        # The queued ids are the later read: a job in both was requeued in between (one job
        # held and queued at once would be admitted twice).
        active = [job for job in active if job.id not in index]
        return [*active, *self._queued_sorted], True

    def _due(self, active: Sequence[Job], now: datetime, *, read: bool) -> datetime | None:
        """The next time a pass has something to do by the clock: a maximum run time that
        ends, or a retry whose backoff ends (the queued jobs' backoffs are looked at when they
        were read)."""
        if read:
            self._backoffs = sorted(
                job.not_before for job in self._queued_sorted if job.not_before is not None
            )
        first = bisect.bisect_right(self._backoffs, now)
        due = self._backoffs[first : first + 1]
        for job in active:
            if (
                job.state is JobState.RUNNING
                and job.spec.max_run_time_s
                and job.started_at
                and not job.stopping
            ):
                due.append(job.started_at + timedelta(seconds=job.spec.max_run_time_s))
        later = [d for d in due if d > now]
        return min(later) if later else None

    async def _enforce_run_times(self, active: Sequence[Job], now: datetime) -> None:
        """Stops the running jobs past ``started_at + max_run_time`` (end reason
        RUN_TIME_EXCEEDED, a user failure for retries)."""
        for job in active:
            limit = job.spec.max_run_time_s
            if job.state is not JobState.RUNNING or not limit or job.stopping:
                continue
            if job.started_at is None or now < job.started_at + timedelta(seconds=limit):
                continue
            message = f"exceeded its maximum run time of {_seconds(limit)}"
            async with self._transaction() as tx:
                # Read again: the pass's snapshot may predate a cancel (which must win).
                current = await tx.get(job.id)
                stopped = None
                if (
                    current is not None
                    and current.state is JobState.RUNNING
                    and not current.stopping
                ):
                    stopped = await tx.replace(
                        current.request_stop(EndReason.RUN_TIME_EXCEEDED, message),
                        expect=current.state,
                    )
            if stopped is not None:
                log.info("job %s %s: stopping it", job.id, message)
                await self._executor.terminate(stopped)

    async def _preempt(self, preemption: Preemption, victim: Job | None) -> None:
        """Asks the victim to stop (SIGTERM, the preemption grace, SIGKILL); it is requeued
        at its place once its process has ended."""
        if victim is None or not victim.state.active or victim.stopping:
            return  # already being stopped: not chosen twice
        async with self._transaction() as tx:
            current = await tx.get(victim.id)
            if current is None or not current.state.active or current.stopping:
                return
            stopped = await tx.replace(
                current.request_stop(EndReason.PREEMPTED, preemption.reason), expect=current.state
            )
            if stopped is None:
                return
            await tx.emit(
                JobEvent(
                    kind=JobEventKind.PREEMPTED,
                    job=stopped,
                    reason=preemption.reason,
                    preempted_by=preemption.preemptor_id,
                )
            )
        log.info("job %s %s", victim.id, preemption.reason)
        if stopped.state is JobState.RUNNING:
            await self._executor.terminate(stopped, grace_s=self._preemption_grace_s)
        # An ADMITTED one is being started: it is stopped once it runs (_admit_and_launch).

    async def _credentials_for(self, job: Job) -> TeamCredentials | Unavailable | _Refused | None:
        """The team's credentials (None: jobs get none); the error when they cannot be obtained
        now; a refusal, which fails the job as a launch failure would."""
        try:
            return await self._credentials.for_team(job.team)
        except Unavailable as exc:
            log.warning(
                "job %s stays queued: MLflow credentials of team %s: %s", job.id, job.team, exc
            )
            return exc
        except PlinthError as exc:
            log.warning("job %s: MLflow credentials of team %s refused: %s", job.id, job.team, exc)
            return _Refused(f"could not obtain the MLflow credentials of team {job.team}: {exc}")

    async def _admit_and_launch(
        self,
        queued: Job,
        credentials: TeamCredentials | _Refused | None,
        *,
        flavor: str,
        queue: str,
    ) -> bool:
        span = tracer.start_span(
            f"job {queued.name}",
            context=extract({"traceparent": queued.traceparent}),
            attributes={
                "plinth.job.id": queued.id,
                "plinth.team": queued.team,
                "plinth.job.attempt": queued.attempt,
            },
        )
        with trace.use_span(span, end_on_exit=False):
            async with self._transaction() as tx:
                job = await tx.replace(
                    queued.admit(now=self._clock(), flavor=flavor, queue=queue),
                    expect=JobState.QUEUED,
                )
                if job is None:  # cancelled meanwhile
                    span.end()
                    return False
                await tx.emit(JobEvent(kind=JobEventKind.ADMITTED, job=job))
            self._run_spans[job.id] = span
            if isinstance(credentials, _Refused):
                await self._finish(
                    job.id,
                    ExitStatus(
                        exit_code=-1, reason=credentials.reason, end_reason=EndReason.LAUNCH_FAILED
                    ),
                    retryable=False,
                )
                return False
            try:
                handle = await self._executor.launch(job, self._environment_for(job, credentials))
            except Unavailable as exc:
                # The engine cannot be reached: not the job's failure, nor one another attempt
                # would fix sooner. It waits at its place until the engine answers again.
                reason = self._engine_down(job, exc)
                # Read again: a cancel (or a preemption) may have come while it was launching.
                async with self._transaction() as tx:
                    current = await tx.get(job.id)
                    requeued = None
                    if current is not None and current.state is JobState.ADMITTED:
                        if not current.cancel_requested:
                            requeued = await tx.replace(current.requeue(), expect=JobState.ADMITTED)
                        if requeued is not None:
                            await tx.emit(
                                JobEvent(
                                    kind=JobEventKind.REQUEUED,
                                    job=requeued,
                                    reason=f"{reason}; requeued at its place",
                                )
                            )
                if current is not None and current.cancel_requested:
                    await self._finish(
                        job.id,
                        ExitStatus(
                            exit_code=-1,
                            reason=CANCELLED_BEFORE_START,
                            end_reason=EndReason.CANCELLED,
                        ),
                    )  # which ends the span
                    return False
                log.warning("job %s stays queued: %s", job.id, reason)
                if requeued is not None:
                    self._queued[requeued.id] = requeued
                    await self._hold_back(requeued, job.flavor, reason)
                self._run_spans.pop(job.id, None)
                span.end()
                return False
            except FailedPrecondition as exc:
                # The engine refused the job (an unknown partition, an invalid image): the
                # same job would be refused again, so it fails at once with the engine's words.
                log.warning("job %s refused by its executor: %s", job.id, exc.message)
                await self._finish(
                    job.id,
                    ExitStatus(
                        exit_code=-1,
                        reason=f"refused by executor {self._executor_kind(job.flavor)}: "
                        f"{exc.message}",
                        end_reason=EndReason.LAUNCH_FAILED,
                    ),
                    failure_kind=FailureKind.USER,
                    retryable=False,
                )
                return False
            except Exception as exc:  # noqa: BLE001 - a job that cannot start has failed
                # A missing program is the job's mistake; anything else the platform's.
                kind = (
                    FailureKind.USER
                    if isinstance(exc, _USER_LAUNCH_ERRORS)
                    else FailureKind.INFRASTRUCTURE
                )
                if kind is FailureKind.INFRASTRUCTURE:
                    self._metrics.start_failed(job.team, self._executor_kind(job.flavor))
                await self._finish(
                    job.id,
                    ExitStatus(
                        exit_code=-1,
                        reason=f"could not start: {exc}",
                        end_reason=EndReason.LAUNCH_FAILED,
                    ),
                    failure_kind=kind,
                )
                return False
            async with self._transaction() as tx:
                current = await tx.get(job.id) or job
                job = (
                    await tx.replace(
                        current.start(pid=handle.pid, now=self._clock()), expect=current.state
                    )
                    or current
                )
                await tx.emit(JobEvent(kind=JobEventKind.STARTED, job=job))
        self._engine_up(job.flavor)
        self._held_back.pop(job.id, None)
        self._watch(job.id, handle)
        if job.cancel_requested:  # cancelled while it was being started
            await self._executor.terminate(job)
        elif job.stop_reason is EndReason.PREEMPTED:  # preempted while it was being started
            await self._executor.terminate(job, grace_s=self._preemption_grace_s)
        return True

    def _environment_for(self, job: Job, credentials: TeamCredentials | None) -> dict[str, str]:
        # Credentials of the scheduler's own environment are never passed on to a job.
        env = {k: v for k, v in self._job_env.base.items() if k not in CREDENTIAL_ENV}
        env.setdefault("MLFLOW_EXPERIMENT_NAME", job.team)
        env.update(job.spec.env)
        carrier: dict[str, str] = {}
        inject(carrier)
        env.update(
            {
                "PLINTH_JOB_ID": job.id,
                "PLINTH_JOB_NAME": job.name,
                "PLINTH_TEAM": job.team,
                "PLINTH_ATTEMPT": str(job.attempt),
                "MLFLOW_TRACKING_URI": self._job_env.mlflow_tracking_uri,
                "TRACEPARENT": carrier.get("traceparent", ""),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if credentials is not None:
            env.update(credentials.environment())
        env.setdefault("OTEL_SERVICE_NAME", f"job-{job.name}")
        return env

    def _watch(self, job_id: str, handle: RunHandle) -> None:
        async def watch() -> None:
            try:
                await self._finish(job_id, await handle.wait())
            finally:
                self._watchers.pop(job_id, None)

        self._watchers[job_id] = asyncio.create_task(watch(), name=f"watch-{job_id}")

    async def _finish(
        self,
        job_id: str,
        status: ExitStatus,
        *,
        failure_kind: FailureKind | None = None,
        retryable: bool = True,
    ) -> None:
        span = self._run_spans.pop(job_id, None)
        if span is None:  # a job re-attached after a restart: continue its submission's trace
            submitted = await self._load(job_id)
            span = tracer.start_span(
                "job finish (re-attached)",
                context=extract({"traceparent": submitted.traceparent}),
                attributes={"plinth.job.id": job_id},
            )
        with trace.use_span(span, end_on_exit=True):
            # A real retry: if the outcome cannot be recorded (the database is busy or briefly
            # down), the job would stay RUNNING until the next restart.
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._finish_attempts),
                wait=wait_random_exponential(multiplier=0.1, max=5.0),
                before_sleep=before_sleep_log(log, logging.WARNING),
                reraise=True,
            ):
                with attempt:
                    await self._record_outcome(
                        job_id, status, failure_kind=failure_kind, retryable=retryable
                    )
        self._wake.set()

    async def _record_outcome(
        self,
        job_id: str,
        status: ExitStatus,
        *,
        failure_kind: FailureKind | None,
        retryable: bool,
    ) -> None:
        ended = await self._record_outcome_once(
            job_id, status, failure_kind=failure_kind, retryable=retryable
        )
        if ended is None:
            return
        job, verdict, now = ended
        # Counted once committed (a retried transaction counts once).
        self._metrics.attempt_ran(job.team, job.queue, job.started_at, now)
        if verdict.outcome is Outcome.REQUEUED and job.stop_reason is not EndReason.PREEMPTED:
            self._metrics.preempted_by_executor(job.team, job.queue)

    async def _record_outcome_once(
        self,
        job_id: str,
        status: ExitStatus,
        *,
        failure_kind: FailureKind | None,
        retryable: bool,
    ) -> tuple[Job, Verdict, datetime] | None:
        """Records the end of the job's attempt; the job as it ran, the verdict and the end
        time, or None when there was nothing to record (it had already ended)."""
        before = await self._store.get(job_id)
        if before is None or not before.state.active:
            return None
        # Read before the transaction opens: with a remote executor this is a network call.
        outputs = await self._executor.outputs(before)
        now = self._clock()
        async with self._transaction() as tx:
            job = await tx.get(job_id)
            if job is None or not job.state.active:
                return None
            verdict = judge(job, status, failure_kind=failure_kind, retryable=retryable)
            await tx.add_attempt(job.id, job.ended_attempt(status, verdict, now=now))
            if verdict.outcome is Outcome.REQUEUED:
                requeued = await tx.replace(job.requeue_after(verdict, now=now), expect=job.state)
                if requeued is not None:
                    await tx.emit(
                        JobEvent(
                            kind=JobEventKind.REQUEUED,
                            job=requeued,
                            reason=f"{verdict.message}; requeued at its place",
                        )
                    )
                return job, verdict, now
            if verdict.outcome is Outcome.RETRYING:
                not_before = now + timedelta(seconds=verdict.backoff_s)
                retried = await tx.replace(
                    job.requeue_after(verdict, now=now, not_before=not_before), expect=job.state
                )
                if retried is not None:
                    await tx.emit(
                        JobEvent(
                            kind=JobEventKind.RETRYING,
                            job=retried,
                            reason=verdict.message,
                            failure_kind=(verdict.failure_kind or FailureKind.USER).value,
                            backoff_s=verdict.backoff_s,
                        )
                    )
                return job, verdict, now
            done = await tx.replace(
                job.finish(status, outputs=outputs, now=now, verdict=verdict), expect=job.state
            )
            if done is None:
                return None
            if done.state is JobState.CANCELLED:
                reason = f"cancelled while running ({status.describe()})"
                await tx.emit(JobEvent(kind=JobEventKind.CANCELLED, job=done, reason=reason))
            else:
                await tx.emit(JobEvent(kind=JobEventKind.FINISHED, job=done))
        self._history.pop((done.team, done.name), None)
        return job, verdict, now

    async def recover(self) -> None:
        """Re-attaches active jobs of a previous scheduler process, or decides their fate:
        admitted but never started -> queued again (same attempt, same place); vanished
        without a status -> an infrastructure failure (retried within its budget).

        A job that was being stopped (preempted, past its run time, cancelled) when the
        scheduler died is asked to stop again: the request may never have reached it. Its
        ending is then judged by the stop request recorded with it (a preempted one is
        requeued). One admitted but never started whose cancel was requested ends CANCELLED.
        Each job is recovered on its own: one that fails is logged, the others go on.
        """
        for job in await self._store.in_states(ACTIVE):
            try:
                await self._recover_one(job)
            except Exception:  # one job's trouble must not keep the rest down
                log.exception("job %s could not be recovered; the next restart tries again", job.id)

    async def _recover_one(self, job: Job) -> None:
        """Re-attaches one active job, or decides its fate (see :meth:`recover`)."""
        handle = await self._executor.reattach(job)
        if handle is not None:
            log.info("re-attached job %s (pid %d)", job.id, handle.pid)
            if job.state is JobState.ADMITTED:
                # Launched by a scheduler that died before recording it: it runs now.
                async with self._transaction() as tx:
                    started = await tx.replace(
                        job.start(pid=handle.pid, now=self._clock()), expect=JobState.ADMITTED
                    )
                    if started is not None:
                        job = started
                        await tx.emit(JobEvent(kind=JobEventKind.STARTED, job=job))
            self._watch(job.id, handle)
            if job.stopping:
                grace = self._preemption_grace_s if job.stop_reason is EndReason.PREEMPTED else None
                await self._executor.terminate(job, grace_s=grace)
        elif job.state is JobState.ADMITTED and job.pid is None and not job.cancel_requested:
            async with self._transaction() as tx:
                await tx.replace(job.requeue(), expect=JobState.ADMITTED)
        elif job.state is JobState.ADMITTED and job.pid is None:
            # Cancelled while it was being started: it never ran, and must not run now.
            await self._finish(
                job.id,
                ExitStatus(
                    exit_code=-1, reason=CANCELLED_BEFORE_START, end_reason=EndReason.CANCELLED
                ),
            )
        else:
            await self._finish(
                job.id,
                ExitStatus(exit_code=-1, reason=LOST, end_reason=EndReason.EXECUTOR_LOST),
            )


@dataclass(frozen=True)
class _Down:
    """A flavor whose engine could not be reached: nothing is launched there before ``until``
    (``time.monotonic()``)."""

    reason: str
    until: float
    failures: int


class _Recorder:
    """A transaction that keeps what it emitted (counted in metrics once it has committed)."""

    def __init__(self, tx: JobTransaction) -> None:
        self._tx = tx
        self.events: builtins.list[JobEvent] = []

    async def get(self, job_id: str) -> Job | None:
        return await self._tx.get(job_id)

    async def add(self, job: Job) -> Job:
        return await self._tx.add(job)

    async def replace(self, job: Job, *, expect: JobState) -> Job | None:
        return await self._tx.replace(job, expect=expect)

    async def emit(self, event: JobEvent) -> None:
        await self._tx.emit(event)
        self.events.append(event)

    async def add_attempt(self, job_id: str, attempt: Attempt) -> None:
        await self._tx.add_attempt(job_id, attempt)


@dataclass(frozen=True)
class _Refused:
    """Credentials the registry refused: the job fails with ``reason``."""

    reason: str


def _request(job: Job) -> dict[str, float]:
    """A job's request per replica in the engine's resource names."""
    resources = job.resources
    return {
        "cpu": resources.cpu,
        "memory": float(resources.memory_bytes),
        "gpu": float(resources.gpu),
    }


def _capacity_of(executor: Executor) -> dict[str, float]:
    capacity = executor.capacity
    return {"cpu": capacity.cpu, "memory": float(capacity.memory_bytes), "gpu": float(capacity.gpu)}


def _first_flavor(config: QueueConfig, queue: str) -> str:
    found: ClusterQueue | None = config.cluster_queues.get(queue)
    return found.flavors[0].flavor if found is not None and found.flavors else ""


def _amount(resource: str, value: float) -> str:
    if resource == "memory":
        return format_bytes(value)
    return f"{value:g} {resource}"


def _load_document(text: str) -> dict[str, Any]:
    """The admin's YAML (or JSON, which is YAML) document as dicts.

    Raises:
        InvalidArgument: ``document`` is empty, not YAML, or not a mapping at the top.
    """
    if not text.strip():
        raise InvalidArgument("document", "is empty: give the queue configuration (YAML or JSON)")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument("document", f"is not YAML or JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise InvalidArgument(
            "document", f"must be a mapping at the top, got {type(loaded).__name__}"
        )
    return loaded


def _to_yaml(document: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(document), sort_keys=False, default_flow_style=False)


def job_base_environment(
    interpreter_dir: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The scheduler's own environment minus platform settings, with the platform's Python first on PATH."""
    environ = os.environ if environ is None else environ
    base = {k: v for k, v in environ.items() if not k.startswith("PLINTH_")}
    base["PATH"] = os.pathsep.join([interpreter_dir, base.get("PATH", "/usr/bin:/bin")])
    return base
