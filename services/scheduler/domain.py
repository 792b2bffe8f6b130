"""The scheduler's domain: jobs, their specs and resources, the life cycle and its rules.

Pure: no I/O, no grpc, no SQL. The store turns rows into these types, the servicer turns them
into protobuf, and the service moves jobs through their states with the transitions below.

A job runs as one or more **attempts**. An attempt ends by itself (exit), by a stop the service
asked for (cancel, preemption, maximum run time), or by the infrastructure (executor lost, launch
failure). :func:`judge` decides what follows: success, a requeue (preemption: the job keeps its
place), a retry after a backoff within the budget of its failure kind (user or infrastructure,
counted apart), or the end.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import signal as signal_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath

from plinth_common.errors import FailedPrecondition, InvalidArgument
from plinth_common.names import check_job_name, check_model_name, check_team, shown

__all__ = [
    "ACTIVE",
    "CANCELLED_BEFORE_START",
    "CREDENTIAL_ENV",
    "DEFAULT_CPU",
    "DEFAULT_MEMORY",
    "LOST",
    "MAX_REPLICAS",
    "MAX_RETRIES",
    "MAX_RUN_TIME_S",
    "Attempt",
    "EndReason",
    "ExitStatus",
    "FailureKind",
    "Job",
    "JobEvent",
    "JobEventKind",
    "JobSpec",
    "JobState",
    "Outcome",
    "PendingInfo",
    "Resources",
    "RetryPolicy",
    "StoredQueueConfig",
    "Verdict",
    "format_bytes",
    "judge",
    "right_sizing_hint",
    "validate_spec",
]

ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_ARGS, MAX_ARG_LEN, MAX_ENV, MAX_ENV_VALUE = 256, 4096, 128, 32 * 1024
DEFAULT_CPU, DEFAULT_MEMORY = 1.0, 512 * 1024**2
RESERVED_ENV_PREFIXES = ("PLINTH_",)
#: The variables that carry MLflow credentials: the platform sets them (the team's MLflow user),
#: a job spec may not, and the scheduler's own environment never leaks them into jobs.
CREDENTIAL_ENV = frozenset(
    {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    }
)
RESERVED_ENV = frozenset({"MLFLOW_TRACKING_URI", "TRACEPARENT"}) | CREDENTIAL_ENV
# Floating-point slack when summing fractional cores.
_CPU_EPSILON = 1e-9
MAX_REPLICAS = 1024
MAX_RUN_TIME_S = 30 * 24 * 3600.0
MAX_RETRIES = 100


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "QUEUED"
    ADMITTED = "ADMITTED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True once the job can change no more."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def active(self) -> bool:
        """True while the job holds resources (admitted or running)."""
        return self in ACTIVE


ACTIVE = (JobState.ADMITTED, JobState.RUNNING)


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What a job asks for, or what the executor has."""

    cpu: float = 0.0
    memory_bytes: int = 0
    gpu: int = 0

    def fits_in(self, free: Resources) -> bool:
        """True if this request fits in ``free``."""
        return (
            self.cpu <= free.cpu + _CPU_EPSILON
            and self.memory_bytes <= free.memory_bytes
            and self.gpu <= free.gpu
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            cpu=self.cpu - other.cpu,
            memory_bytes=self.memory_bytes - other.memory_bytes,
            gpu=self.gpu - other.gpu,
        )


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often a failed job is tried again, per failure kind, and how long it waits first.

    The n-th retry of a kind waits ``min(backoff_max_s, backoff_initial_s * 2**(n-1))`` seconds
    (no jitter: the wait is what the job's events and ``plinth jobs get`` say it is).
    """

    user_failure_limit: int = 0
    infrastructure_failure_limit: int = 5
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 600.0

    def limit(self, kind: FailureKind) -> int:
        """The number of retries allowed after failures of ``kind``."""
        if kind is FailureKind.USER:
            return self.user_failure_limit
        return self.infrastructure_failure_limit

    def backoff_s(self, retry_number: int) -> float:
        """The wait before the ``retry_number``-th (1-based) retry of a kind."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, retry_number - 1))


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What a user submits.

    Attributes:
        priority: a priority class name ('' : the queue's default).
        replicas: workers admitted and run together, all or nothing (gang).
        max_run_time_s: the job is stopped once it has run this long (0: no limit).
        retry: the retry budgets and backoff.
    """

    name: str
    team: str
    entrypoint: Sequence[str]
    working_dir: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    register_as: str = ""
    priority: str = ""
    replicas: int = 1
    max_run_time_s: float = 0.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class EndReason(enum.StrEnum):
    """Why an attempt ended, in words a user and a retry policy both understand.

    The executor reports what it can see (``EXITED``, ``OOM_KILLED`` where it can tell,
    ``EXECUTOR_LOST`` when the job's supervisor died, ``LAUNCH_FAILED``); the service replaces it
    with ``PREEMPTED``, ``CANCELLED`` or ``RUN_TIME_EXCEEDED`` when it asked for the stop itself.
    Everything but ``EXITED``, ``OOM_KILLED``, ``CANCELLED`` and ``RUN_TIME_EXCEEDED`` is the
    platform's fault, not the job's (retries count them apart).
    """

    EXITED = "exited"
    OOM_KILLED = "oom_killed"
    PREEMPTED = "preempted"
    EVICTED = "evicted"
    UNSCHEDULABLE = "unschedulable"
    RUN_TIME_EXCEEDED = "run_time_exceeded"
    EXECUTOR_LOST = "executor_lost"
    CANCELLED = "cancelled"
    LAUNCH_FAILED = "launch_failed"


_END_REASON_WORDS: dict[EndReason, str] = {
    EndReason.OOM_KILLED: "killed for running out of memory",
    EndReason.PREEMPTED: "preempted",
    EndReason.EVICTED: "evicted",
    EndReason.UNSCHEDULABLE: "unschedulable",
    EndReason.RUN_TIME_EXCEEDED: "stopped after its maximum run time",
    EndReason.EXECUTOR_LOST: "lost with its executor",
    EndReason.CANCELLED: "cancelled",
    EndReason.LAUNCH_FAILED: "could not be started",
}


@dataclass(frozen=True, kw_only=True)
class ExitStatus:
    """How one attempt of a job ended, and what it used while it ran.

    ``exit_code`` or ``signal`` say how the process ended; ``end_reason`` says why (see
    :class:`EndReason`). ``peak_memory_bytes`` is the largest resident set of any of the job's
    processes (the maximum over a gang's replicas) and ``cpu_seconds`` their user plus system time
    (summed over replicas); both are 0 when the executor could not measure them.
    """

    exit_code: int
    signal: int = 0
    reason: str = ""
    peak_memory_bytes: int = 0
    cpu_seconds: float = 0.0
    end_reason: EndReason = EndReason.EXITED

    @property
    def succeeded(self) -> bool:
        """Exit code 0, no signal, and it ended by itself (exiting 0 when preempted is not it)."""
        return (
            self.exit_code == 0
            and self.signal == 0
            and not self.reason
            and self.end_reason is EndReason.EXITED
        )

    def describe(self) -> str:
        """A human sentence, e.g. "killed by signal 9 (SIGKILL)"."""
        if self.reason:
            return self.reason
        name = ""
        if self.signal:
            try:
                name = signal_module.Signals(self.signal).name
            except ValueError:
                name = "unknown"
        why = _END_REASON_WORDS.get(self.end_reason)
        if why:  # e.g. "preempted (SIGTERM)", "preempted (exit code 0)"
            return f"{why} ({name or f'exit code {self.exit_code}'})"
        if self.signal:
            return f"killed by signal {self.signal} ({name})"
        return f"exit code {self.exit_code}"


CANCELLED_BEFORE_START = "cancelled before it started"
LOST = "lost: its process ended while the scheduler was down and left no exit status"


class FailureKind(enum.StrEnum):
    """Whose fault a failed attempt was; each kind has its own retry budget."""

    USER = "user"  # a non-zero exit, running out of memory, the maximum run time exceeded
    INFRASTRUCTURE = "infrastructure"  # executor lost, launch failure, eviction


# The end reasons that are the job's own doing; the rest are the platform's.
_USER_END_REASONS = frozenset({EndReason.EXITED, EndReason.OOM_KILLED, EndReason.RUN_TIME_EXCEEDED})


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One run of a job, finished or (``end_reason`` None) in progress.

    Attributes:
        queued_at: when this attempt started waiting (submission, or the requeue/retry).
        requested: per replica.
        peak_memory_bytes: the largest resident set measured (0: unknown).
        cpu_seconds: user plus system time of the attempt's processes.
    """

    number: int
    flavor: str = ""
    queued_at: datetime | None = None
    admitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    end_reason: EndReason | None = None
    exit_code: int = 0
    signal: int = 0
    message: str = ""
    requested: Resources = field(default_factory=Resources)
    replicas: int = 1
    peak_memory_bytes: int = 0
    cpu_seconds: float = 0.0

    @property
    def queue_wait_s(self) -> float:
        """Seconds from queued to admitted (0 until admitted)."""
        if self.queued_at is None or self.admitted_at is None:
            return 0.0
        return max(0.0, (self.admitted_at - self.queued_at).total_seconds())

    @property
    def run_s(self) -> float:
        """Seconds from started to finished (0 until both are known)."""
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return max(0.0, (self.finished_at - self.started_at).total_seconds())


@dataclass(frozen=True, kw_only=True)
class PendingInfo:
    """Where a queued job stands, from the admission engine's report.

    Attributes:
        reason: why it is not admitted yet, a sentence with numbers.
        estimated_start: None when unknown; ``estimate_basis`` says how it was estimated.
    """

    position_in_queue: int
    position_in_cohort: int
    reason: str
    estimated_start: datetime | None
    estimate_basis: str


class Outcome(enum.StrEnum):
    """What follows the end of an attempt."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"  # preempted: back in the queue at its place
    RETRYING = "retrying"  # failed within its budget: back in the queue after a backoff


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """:func:`judge`'s decision on an ended attempt.

    Attributes:
        end_reason: why the attempt ended (the service's stop request wins over the executor's
            view).
        message: how it ended, in words (the failure reason when the job fails).
        failure_kind: set for a failed attempt.
        backoff_s: the wait before the retry (RETRYING only).
    """

    outcome: Outcome
    end_reason: EndReason
    message: str
    failure_kind: FailureKind | None = None
    backoff_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Job:
    """A submitted job and what happened to it so far.

    ``spec.working_dir`` is the directory the job runs in (a default one when the submission
    named none). ``seq`` is the store's order of submission (0 until stored).

    Attributes:
        queue: the cluster queue its team submitted to (as of submission).
        flavor: the flavor of the current (or last) admission.
        priority: the resolved priority class; ``priority_value`` its value at submission.
        attempt: the current (or last) attempt, 1-based.
        queue_order: its place within equal priority (smaller first): the submission time in
            epoch seconds, kept when preempted; a retry's ``not_before``.
        queued_at: when the current attempt started waiting.
        not_before: no admission before this time (a retry's backoff).
        stop_reason: a stop the service asked for (preemption, maximum run time), and
            ``stop_message`` why; ``cancel_requested`` is the user's stop.
        user_failures, infrastructure_failures: failed attempts so far, per kind.
        attempts: the finished attempts, oldest first (the store fills them for reads).
        pending: where a queued job stands (the service fills it for reads).
    """

    id: str
    spec: JobSpec
    state: JobState
    created_at: datetime
    seq: int = 0
    admitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    signal: int | None = None
    failure_reason: str = ""
    mlflow_run_id: str = ""
    outputs: Mapping[str, str] = field(default_factory=dict)
    pid: int | None = None
    traceparent: str = ""
    cancel_requested: bool = False
    queue: str = ""
    flavor: str = ""
    priority: str = ""
    priority_value: int = 0
    attempt: int = 1
    queue_order: float = 0.0
    queued_at: datetime | None = None
    not_before: datetime | None = None
    stop_reason: EndReason | None = None
    stop_message: str = ""
    user_failures: int = 0
    infrastructure_failures: int = 0
    attempts: tuple[Attempt, ...] = ()
    pending: PendingInfo | None = None

    @property
    def name(self) -> str:
        """The job's name."""
        return self.spec.name

    @property
    def team(self) -> str:
        """The team that owns the job."""
        return self.spec.team

    @property
    def resources(self) -> Resources:
        """What each replica holds while active."""
        return self.spec.resources

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for (cancel, preemption, maximum run time)."""
        return self.cancel_requested or self.stop_reason is not None

    def current_attempt(self) -> Attempt | None:
        """The attempt in progress (queued or active), None once the job has ended."""
        if self.state.terminal:
            return None
        return Attempt(
            number=self.attempt,
            flavor=self.flavor if self.state.active else "",
            queued_at=self.queued_at or self.created_at,
            admitted_at=self.admitted_at,
            started_at=self.started_at,
            requested=self.resources,
            replicas=self.spec.replicas,
        )

    def all_attempts(self) -> tuple[Attempt, ...]:
        """Finished attempts plus the one in progress."""
        current = self.current_attempt()
        if current is None or any(a.number == current.number for a in self.attempts):
            return self.attempts
        return (*self.attempts, current)

    def admit(self, *, now: datetime, flavor: str = "", queue: str = "") -> Job:
        """QUEUED -> ADMITTED: quota is held in ``flavor`` of ``queue`` (the team's queue when
        admitted, which a new configuration may have changed), the process is not started yet."""
        self._expect(JobState.QUEUED)
        return dataclasses.replace(
            self,
            state=JobState.ADMITTED,
            admitted_at=now,
            flavor=flavor,
            queue=queue or self.queue,
            not_before=None,
        )

    def requeue(self) -> Job:
        """ADMITTED -> QUEUED, the same attempt: admitted by a scheduler that died before
        starting the process, or not launched (its engine was unreachable). A stop requested
        of the admission (a preemption) is void: the job holds nothing any more."""
        self._expect(JobState.ADMITTED)
        return dataclasses.replace(
            self, state=JobState.QUEUED, admitted_at=None, stop_reason=None, stop_message=""
        )

    def start(self, *, pid: int, now: datetime) -> Job:
        """ADMITTED -> RUNNING with the process that runs it."""
        self._expect(JobState.ADMITTED)
        return dataclasses.replace(self, state=JobState.RUNNING, started_at=now, pid=pid)

    def request_cancel(self) -> Job:
        """Notes that an active job is to end CANCELLED once its process is stopped."""
        self._expect(*ACTIVE)
        return dataclasses.replace(self, cancel_requested=True)

    def request_stop(self, reason: EndReason, message: str) -> Job:
        """Notes that the service stops an active job (preemption, maximum run time)."""
        self._expect(*ACTIVE)
        return dataclasses.replace(self, stop_reason=reason, stop_message=message)

    def cancel_queued(self, *, now: datetime) -> Job:
        """QUEUED -> CANCELLED: it never ran."""
        self._expect(JobState.QUEUED)
        return dataclasses.replace(
            self, state=JobState.CANCELLED, finished_at=now, failure_reason=CANCELLED_BEFORE_START
        )

    def ended_attempt(self, status: ExitStatus, verdict: Verdict, *, now: datetime) -> Attempt:
        """The record of the active attempt that ``status`` ended."""
        self._expect(*ACTIVE)
        return Attempt(
            number=self.attempt,
            flavor=self.flavor,
            queued_at=self.queued_at or self.created_at,
            admitted_at=self.admitted_at,
            started_at=self.started_at,
            finished_at=now,
            end_reason=verdict.end_reason,
            exit_code=status.exit_code,
            signal=status.signal,
            message=verdict.message,
            requested=self.resources,
            replicas=self.spec.replicas,
            peak_memory_bytes=status.peak_memory_bytes,
            cpu_seconds=status.cpu_seconds,
        )

    def requeue_after(
        self, verdict: Verdict, *, now: datetime, not_before: datetime | None = None
    ) -> Job:
        """ADMITTED or RUNNING -> QUEUED for the next attempt (a preemption or a retry).

        A preempted job keeps its ``queue_order`` (its place); a retried one queues by its
        ``not_before``, counted against the budget of its failure kind.
        """
        self._expect(*ACTIVE)
        kind = verdict.failure_kind
        return dataclasses.replace(
            self,
            state=JobState.QUEUED,
            attempt=self.attempt + 1,
            admitted_at=None,
            started_at=None,
            pid=None,
            stop_reason=None,
            stop_message="",
            queued_at=now,
            not_before=not_before,
            queue_order=not_before.timestamp() if not_before is not None else self.queue_order,
            user_failures=self.user_failures + (kind is FailureKind.USER),
            infrastructure_failures=self.infrastructure_failures
            + (kind is FailureKind.INFRASTRUCTURE),
        )

    def finish(
        self,
        status: ExitStatus,
        *,
        outputs: Mapping[str, str],
        now: datetime,
        verdict: Verdict | None = None,
    ) -> Job:
        """ADMITTED or RUNNING -> CANCELLED (if asked to), SUCCEEDED or FAILED."""
        self._expect(*ACTIVE)
        verdict = verdict or judge(self, status)
        if verdict.outcome is Outcome.CANCELLED:
            state, reason = JobState.CANCELLED, "cancelled"
        elif verdict.outcome is Outcome.SUCCEEDED:
            state, reason = JobState.SUCCEEDED, ""
        else:
            state, reason = JobState.FAILED, verdict.message
        cancelled = state is JobState.CANCELLED
        return dataclasses.replace(
            self,
            state=state,
            finished_at=now,
            exit_code=status.exit_code,
            signal=status.signal,
            failure_reason=reason,
            outputs=dict(outputs),
            mlflow_run_id="" if cancelled else outputs.get("mlflow_run_id", ""),
            user_failures=self.user_failures + (verdict.failure_kind is FailureKind.USER),
            infrastructure_failures=self.infrastructure_failures
            + (verdict.failure_kind is FailureKind.INFRASTRUCTURE),
        )

    def _expect(self, *states: JobState) -> None:
        if self.state not in states:
            raise FailedPrecondition(
                f"job {self.id} is {self.state.value}", job_id=self.id, state=self.state.value
            )


def judge(
    job: Job,
    status: ExitStatus,
    *,
    failure_kind: FailureKind | None = None,
    retryable: bool = True,
) -> Verdict:
    """Decides what follows the end of ``job``'s active attempt.

    A cancel wins; a preemption always requeues (it counts against no budget), whether Plinth
    asked for it or the engine reports it (``EndReason.PREEMPTED``); otherwise a
    success succeeds, and a failure is retried while the budget of its kind lasts.

    Args:
        failure_kind: overrides the kind the end reason implies (a launch that failed because
            the entrypoint does not exist is the user's failure).
        retryable: False for a failure that another attempt cannot fix (refused credentials).
    """
    if job.cancel_requested:
        return Verdict(
            outcome=Outcome.CANCELLED, end_reason=EndReason.CANCELLED, message="cancelled"
        )
    if job.stop_reason is EndReason.PREEMPTED:
        return Verdict(
            outcome=Outcome.REQUEUED,
            end_reason=EndReason.PREEMPTED,
            message=job.stop_message or "preempted",
        )
    if job.stop_reason is None and status.end_reason is EndReason.PREEMPTED:
        # The engine took the job back (a SLURM preemption, a Kueue eviction): as with a
        # preemption by Plinth, it waits again at its place and burns no retry budget.
        return Verdict(
            outcome=Outcome.REQUEUED,
            end_reason=EndReason.PREEMPTED,
            message=f"preempted by its executor: {status.describe()}",
        )
    end_reason: EndReason
    if job.stop_reason is not None:
        end_reason, message = job.stop_reason, job.stop_message or status.describe()
    elif status.succeeded:
        return Verdict(outcome=Outcome.SUCCEEDED, end_reason=EndReason.EXITED, message="")
    else:
        end_reason, message = status.end_reason, status.describe()
    kind = failure_kind or (
        FailureKind.USER if end_reason in _USER_END_REASONS else FailureKind.INFRASTRUCTURE
    )
    used = job.user_failures if kind is FailureKind.USER else job.infrastructure_failures
    limit = job.spec.retry.limit(kind)
    if retryable and used < limit:
        return Verdict(
            outcome=Outcome.RETRYING,
            end_reason=end_reason,
            message=message,
            failure_kind=kind,
            backoff_s=job.spec.retry.backoff_s(used + 1),
        )
    if limit > 0 and retryable:
        message = f"{message}; {kind.value} failure retries used up ({limit} of {limit})"
    return Verdict(
        outcome=Outcome.FAILED, end_reason=end_reason, message=message, failure_kind=kind
    )


@dataclass(frozen=True, kw_only=True)
class StoredQueueConfig:
    """A queue configuration as applied: the admin's document (as loaded), who and when."""

    version: int
    document: Mapping[str, object]
    applied_at: datetime
    applied_by: str


class JobEventKind(enum.StrEnum):
    """The life-cycle events a job emits (``plinth.job.<kind>``)."""

    SUBMITTED = "submitted"
    ADMITTED = "admitted"
    STARTED = "started"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"
    REQUEUED = "requeued"
    RETRYING = "retrying"


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """A life-cycle event, recorded in the same transaction as the change that caused it.

    Attributes:
        reason: why, in words (cancel, preemption, requeue, retry).
        preempted_by: the preemptor's job id (PREEMPTED).
        failure_kind: ``user`` or ``infrastructure`` (RETRYING).
        backoff_s: the wait before the retry (RETRYING; ``job.not_before`` is its end).
    """

    kind: JobEventKind
    job: Job
    reason: str = ""
    preempted_by: str = ""
    failure_kind: str = ""
    backoff_s: float = 0.0


def validate_spec(spec: JobSpec) -> JobSpec:
    """Checks a submission and fills in defaults (the directory's existence is the executor's,
    whether a queue can ever hold it the admission engine's).

    Raises:
        InvalidArgument: naming the first field that is wrong.
    """
    check_job_name(spec.name, "spec.name")
    check_team(spec.team, "spec.team")
    _check_entrypoint(spec.entrypoint)
    if spec.working_dir and (
        len(spec.working_dir) > MAX_ARG_LEN or not PurePosixPath(spec.working_dir).is_absolute()
    ):
        raise InvalidArgument(
            "spec.working_dir", f"must be an absolute path, got {shown(spec.working_dir)}"
        )
    _check_env(spec.env)
    if spec.register_as:
        check_model_name(spec.register_as, "spec.register_as")
    replicas = spec.replicas or 1
    if not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidArgument(
            "spec.replicas", f"must be between 1 and {MAX_REPLICAS}, got {spec.replicas}"
        )
    if not math.isfinite(spec.max_run_time_s) or not 0 <= spec.max_run_time_s <= MAX_RUN_TIME_S:
        raise InvalidArgument(
            "spec.max_run_time_seconds",
            f"must be between 0 (no limit) and {MAX_RUN_TIME_S:.0f} (30 days), "
            f"got {spec.max_run_time_s:.15g}",
        )
    return JobSpec(
        name=spec.name,
        team=spec.team,
        entrypoint=tuple(spec.entrypoint),
        working_dir=spec.working_dir,
        env=dict(spec.env),
        resources=_check_resources(spec.resources),
        register_as=spec.register_as,
        priority=spec.priority,
        replicas=replicas,
        max_run_time_s=spec.max_run_time_s,
        retry=_check_retry(spec.retry),
    )


def _check_retry(retry: RetryPolicy) -> RetryPolicy:
    for name in ("user_failure_limit", "infrastructure_failure_limit"):
        value = getattr(retry, name)
        if not 0 <= value <= MAX_RETRIES:
            raise InvalidArgument(
                f"spec.retry.{name}", f"must be between 0 and {MAX_RETRIES}, got {value}"
            )
    for name in ("backoff_initial_s", "backoff_max_s"):
        value = getattr(retry, name)
        if not math.isfinite(value) or not 0 <= value <= MAX_RUN_TIME_S:
            field_name = f"spec.retry.{name.removesuffix('_s')}_seconds"
            raise InvalidArgument(
                field_name, f"must be between 0 and {MAX_RUN_TIME_S:g} seconds, got {value:g}"
            )
    if retry.backoff_max_s < retry.backoff_initial_s:
        raise InvalidArgument(
            "spec.retry.backoff_max_seconds",
            f"must be at least backoff_initial_seconds ({retry.backoff_initial_s:g}), "
            f"got {retry.backoff_max_s:g}",
        )
    return retry


def _check_entrypoint(entrypoint: Sequence[str]) -> None:
    if not entrypoint or not entrypoint[0].strip():
        raise InvalidArgument("spec.entrypoint", "must name a command to run")
    if len(entrypoint) > MAX_ARGS:
        raise InvalidArgument(
            "spec.entrypoint", f"at most {MAX_ARGS} arguments, got {len(entrypoint)}"
        )
    for arg in entrypoint:
        if len(arg) > MAX_ARG_LEN or "\x00" in arg:
            raise InvalidArgument(
                "spec.entrypoint",
                f"each argument at most {MAX_ARG_LEN} characters, no NUL, got {shown(arg)}",
            )


def _check_env(env: Mapping[str, str]) -> None:
    if len(env) > MAX_ENV:
        raise InvalidArgument("spec.env", f"at most {MAX_ENV} variables, got {len(env)}")
    for key, value in env.items():
        if not ENV_KEY.fullmatch(key):
            raise InvalidArgument("spec.env", f"{shown(key)} is not a valid variable name")
        if key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIXES):
            raise InvalidArgument("spec.env", f"{key} is set by the platform")
        if len(value) > MAX_ENV_VALUE or "\x00" in value:
            raise InvalidArgument(
                "spec.env", f"{key}: value at most {MAX_ENV_VALUE} characters, no NUL"
            )


def _check_resources(requested: Resources) -> Resources:
    cpu = requested.cpu or DEFAULT_CPU
    memory = requested.memory_bytes or DEFAULT_MEMORY
    if not math.isfinite(cpu) or cpu < 0:
        raise InvalidArgument(
            "spec.resources.cpu", f"must be a positive number of cores, got {requested.cpu}"
        )
    if memory < 0:
        raise InvalidArgument(
            "spec.resources.memory_bytes", f"must not be negative, got {requested.memory_bytes}"
        )
    if requested.gpu < 0:
        raise InvalidArgument("spec.resources.gpu", f"must not be negative, got {requested.gpu}")
    return Resources(cpu=cpu, memory_bytes=memory, gpu=requested.gpu)


_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(amount: float) -> str:
    """``8 GiB``, ``900 MiB``, ``1.5 GiB``: binary units, at most one decimal."""
    value, unit = float(amount), _BYTE_UNITS[0]
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            break
        value /= 1024
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {unit}"


# Below this share of what it asked for, a job is told to ask for less.
_RIGHT_SIZING_SHARE = 0.25
# A suggestion leaves this much headroom above what was used.
_HEADROOM = 1.5
_MEMORY_STEP = 256 * 1024**2


def right_sizing_hint(attempts: Sequence[Attempt]) -> str:
    """A suggestion when the last measured attempt used under a quarter of what it asked for
    (memory, or cpu time over run time): "asked for 8 GiB, peaked at 900 MiB: request 1.5 GiB".
    '' when it used its request well or nothing was measured."""
    measured = [
        a for a in attempts if a.end_reason is not None and (a.peak_memory_bytes or a.cpu_seconds)
    ]
    if not measured:
        return ""
    last = measured[-1]
    hints: list[str] = []
    asked = last.requested.memory_bytes
    if last.peak_memory_bytes and asked and last.peak_memory_bytes < _RIGHT_SIZING_SHARE * asked:
        # The peak is per gang (the largest replica), the request per replica: comparable.
        suggested = math.ceil(last.peak_memory_bytes * _HEADROOM / _MEMORY_STEP) * _MEMORY_STEP
        hints.append(
            f"asked for {format_bytes(asked)}, peaked at {format_bytes(last.peak_memory_bytes)}: "
            f"request {format_bytes(suggested)}"
        )
    cores = last.requested.cpu * max(1, last.replicas)
    if last.run_s > 0 and cores > 0 and last.cpu_seconds:
        used = last.cpu_seconds / last.run_s  # average cores busy over the attempt
        if used < _RIGHT_SIZING_SHARE * cores:
            per_replica = used / max(1, last.replicas)
            suggested_cpu = max(0.1, math.ceil(per_replica * _HEADROOM * 10) / 10)
            hints.append(
                f"asked for {last.requested.cpu:g} cpu, used {per_replica:.2f} on average: "
                f"request {suggested_cpu:g} cpu"
            )
    return "; ".join(hints)
