"""The scheduler's domain: jobs, their specs and resources, the life cycle and its rules.

Pure: no I/O, no grpc, no SQL. The store turns rows into these types, the servicer turns them
into protobuf, and the service moves jobs through their states with the transitions below.
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
    "EndReason",
    "ExitStatus",
    "Job",
    "JobEvent",
    "JobEventKind",
    "JobSpec",
    "JobState",
    "Resources",
    "admissible",
    "free_capacity",
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
class JobSpec:
    """What a user submits."""

    name: str
    team: str
    entrypoint: Sequence[str]
    working_dir: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    register_as: str = ""


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


@dataclass(frozen=True, kw_only=True)
class Job:
    """A submitted job and what happened to it so far.

    ``spec.working_dir`` is the directory the job runs in (a default one when the submission
    named none). ``seq`` is the store's order of submission (0 until stored).
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
        """What the job holds while active."""
        return self.spec.resources

    def admit(self, *, now: datetime) -> Job:
        """QUEUED -> ADMITTED: capacity is reserved, the process is not started yet."""
        self._expect(JobState.QUEUED)
        return dataclasses.replace(self, state=JobState.ADMITTED, admitted_at=now)

    def requeue(self) -> Job:
        """ADMITTED -> QUEUED: admitted by a scheduler that died before starting the process."""
        self._expect(JobState.ADMITTED)
        return dataclasses.replace(self, state=JobState.QUEUED, admitted_at=None)

    def start(self, *, pid: int, now: datetime) -> Job:
        """ADMITTED -> RUNNING with the process that runs it."""
        self._expect(JobState.ADMITTED)
        return dataclasses.replace(self, state=JobState.RUNNING, started_at=now, pid=pid)

    def request_cancel(self) -> Job:
        """Notes that an active job is to end CANCELLED once its process is stopped."""
        self._expect(*ACTIVE)
        return dataclasses.replace(self, cancel_requested=True)

    def cancel_queued(self, *, now: datetime) -> Job:
        """QUEUED -> CANCELLED: it never ran."""
        self._expect(JobState.QUEUED)
        return dataclasses.replace(
            self, state=JobState.CANCELLED, finished_at=now, failure_reason=CANCELLED_BEFORE_START
        )

    def finish(self, status: ExitStatus, *, outputs: Mapping[str, str], now: datetime) -> Job:
        """ADMITTED or RUNNING -> CANCELLED (if asked to), SUCCEEDED or FAILED."""
        self._expect(*ACTIVE)
        if self.cancel_requested:
            state, reason = JobState.CANCELLED, "cancelled"
        elif status.succeeded:
            state, reason = JobState.SUCCEEDED, ""
        else:
            state, reason = JobState.FAILED, status.describe()
        return dataclasses.replace(
            self,
            state=state,
            finished_at=now,
            exit_code=status.exit_code,
            signal=status.signal,
            failure_reason=reason,
            outputs=dict(outputs),
            mlflow_run_id="" if self.cancel_requested else outputs.get("mlflow_run_id", ""),
        )

    def _expect(self, *states: JobState) -> None:
        if self.state not in states:
            raise FailedPrecondition(
                f"job {self.id} is {self.state.value}", job_id=self.id, state=self.state.value
            )


class JobEventKind(enum.StrEnum):
    """The life-cycle events a job emits (``plinth.job.<kind>``)."""

    SUBMITTED = "submitted"
    ADMITTED = "admitted"
    STARTED = "started"
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """A life-cycle event, recorded in the same transaction as the change that caused it."""

    kind: JobEventKind
    job: Job
    reason: str = ""


def validate_spec(spec: JobSpec, capacity: Resources) -> JobSpec:
    """Checks a submission and fills in defaults (the directory's existence is the executor's).

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
    return JobSpec(
        name=spec.name,
        team=spec.team,
        entrypoint=tuple(spec.entrypoint),
        working_dir=spec.working_dir,
        env=dict(spec.env),
        resources=_check_resources(spec.resources, capacity),
        register_as=spec.register_as,
    )


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


def _check_resources(requested: Resources, capacity: Resources) -> Resources:
    cpu = requested.cpu or DEFAULT_CPU
    memory = requested.memory_bytes or DEFAULT_MEMORY
    if not math.isfinite(cpu) or cpu < 0:
        raise InvalidArgument(
            "spec.resources.cpu", f"must be a positive number of cores, got {requested.cpu}"
        )
    if cpu > capacity.cpu:
        raise InvalidArgument(
            "spec.resources.cpu", f"{cpu:g} cores exceeds what the executor has ({capacity.cpu:g})"
        )
    if memory < 0:
        raise InvalidArgument(
            "spec.resources.memory_bytes", f"must not be negative, got {requested.memory_bytes}"
        )
    if memory > capacity.memory_bytes:
        raise InvalidArgument(
            "spec.resources.memory_bytes",
            f"{memory} bytes exceeds what the executor has ({capacity.memory_bytes})",
        )
    if requested.gpu < 0:
        raise InvalidArgument("spec.resources.gpu", f"must not be negative, got {requested.gpu}")
    if requested.gpu > capacity.gpu:
        raise InvalidArgument(
            "spec.resources.gpu",
            f"{requested.gpu} GPUs exceeds what the executor has ({capacity.gpu})",
        )
    return Resources(cpu=cpu, memory_bytes=memory, gpu=requested.gpu)


def free_capacity(capacity: Resources, active: Sequence[Job]) -> Resources:
    """What is left of ``capacity`` once the active jobs hold theirs."""
    free = capacity
    for job in active:
        free = free - job.resources
    return free


def admissible(queued: Sequence[Job], free: Resources) -> list[Job]:
    """The queued jobs (oldest first) to admit now: strict FIFO, so a big job at the head of
    the queue is not overtaken by smaller ones behind it."""
    chosen: list[Job] = []
    for job in queued:
        if not job.resources.fits_in(free):
            break
        chosen.append(job)
        free = free - job.resources
    return chosen
