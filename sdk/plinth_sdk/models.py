"""Typed values the SDK returns, converted from the generated protobuf messages.

Callers of the SDK never see protobuf: every RPC result becomes one of the frozen dataclasses
here, with Python types (``datetime`` in UTC, ``tuple``, ``dict``, :class:`JobState`).
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from plinth.features.v1 import features_pb2
from plinth.gateway.v1 import gateway_pb2
from plinth.registry.v1 import registry_pb2
from plinth.scheduler.v1 import scheduler_pb2
from plinth.serving.v1 import serving_pb2

__all__ = [
    "ApiKey",
    "AppliedRepository",
    "Approval",
    "Attempt",
    "AuditRecord",
    "ClusterQueueStatus",
    "Deployment",
    "DeploymentState",
    "EndReason",
    "Event",
    "FeatureView",
    "FieldStatus",
    "Identity",
    "Job",
    "JobState",
    "Materialization",
    "Member",
    "ModelVersion",
    "NewApiKey",
    "OnlineRow",
    "PendingInfo",
    "PendingJob",
    "PolicyReport",
    "PolicyRule",
    "Promotion",
    "PromotionPolicy",
    "PromotionRecord",
    "QueueConfigInfo",
    "QueueStatus",
    "QuotaUsage",
    "RegisteredModel",
    "Role",
    "Run",
    "Team",
    "VersionApproval",
    "parse_memory",
    "parse_rule",
]

_PROTO_STATE_PREFIX = "JOB_STATE_"


class JobState(enum.StrEnum):
    """Life-cycle state of a training job; the value is the proto name without its prefix."""

    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    ADMITTED = "ADMITTED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """True once the job can no longer change state."""
        return self in _TERMINAL_STATES

    @classmethod
    def from_proto(cls, value: int) -> JobState:
        """Converts a ``plinth.scheduler.v1.JobState`` number.

        Numbers this SDK does not know yet (a newer server) read as UNSPECIFIED rather than
        failing, so an old client can still list jobs.
        """
        try:
            name = scheduler_pb2.JobState.Name(value)
        except ValueError:
            return cls.UNSPECIFIED
        return cls(name.removeprefix(_PROTO_STATE_PREFIX))

    def to_proto(self) -> int:
        """Returns the ``plinth.scheduler.v1.JobState`` number."""
        return int(scheduler_pb2.JobState.Value(_PROTO_STATE_PREFIX + self.value))

    @classmethod
    def parse(cls, text: str | JobState) -> JobState:
        """Reads ``"running"``, ``"RUNNING"`` or ``"JOB_STATE_RUNNING"``.

        Raises:
            ValueError: the text names no state.
        """
        if isinstance(text, JobState):
            return text
        name = text.strip().upper().removeprefix(_PROTO_STATE_PREFIX)
        try:
            return cls(name)
        except ValueError:
            known = ", ".join(s.value for s in cls if s is not cls.UNSPECIFIED)
            raise ValueError(f"unknown job state {text!r}; expected one of {known}") from None


_TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class Job:
    """A training job as the scheduler reports it.

    Attributes:
        id: Server-assigned job id.
        name: DNS-label name given at submission.
        team: Owning team.
        entrypoint: The argv the job runs; ``entrypoint[0]`` is the program.
        working_dir: Absolute working folder, or "" for a fresh folder per job.
        env: Extra environment variables of the job.
        cpu: Requested cores (0 means the server default).
        memory_bytes: Requested memory (0 means the server default).
        gpu: Requested GPUs.
        register_as: Model name the logged model is registered under, or "".
        state: Current life-cycle state.
        created_at: Submission time (UTC).
        started_at: Start time (UTC), None before the job starts.
        finished_at: End time (UTC), None while the job has not ended.
        exit_code: Process exit code; meaningful once finished and ``signal == 0``.
        signal: Number of the signal that killed the process, 0 if none.
        failure_reason: Why the job failed, or "".
        mlflow_run_id: The MLflow run the job logged to, or "".
        outputs: Key/value outputs the job recorded (see ``plinth_sdk.job_context``).
        priority: The priority class (resolved by the server; "" from an older one).
        priority_value: That class's value (higher goes first).
        replicas: Workers admitted together (gang admission).
        max_run_time_seconds: Stopped past this run time; 0 for no limit.
        user_failure_limit: Retries after a non-zero exit; None for the server default (0).
        infrastructure_failure_limit: Retries after an infrastructure failure; None for the
            server default (5).
        queue: The cluster queue of the job's team.
        flavor: The resource flavor of the current (or last) admission, or "".
        attempt: The current or last attempt, 1-based (0 before the first admission).
        attempts: Every attempt so far, the current one last.
        pending: Where the job stands in its queue, while it is QUEUED; else None.
        right_sizing_hint: How to ask for less when it used far less than it asked for.
        admitted_at: When the current (or last) attempt was admitted (UTC), or None.
        queue_wait_seconds: How long the current (or last) attempt waited for admission.
    """

    id: str
    name: str
    team: str
    entrypoint: tuple[str, ...]
    working_dir: str
    env: Mapping[str, str] = field(hash=False)
    cpu: float
    memory_bytes: int
    gpu: int
    register_as: str
    state: JobState
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int
    signal: int
    failure_reason: str
    mlflow_run_id: str
    outputs: Mapping[str, str] = field(hash=False)
    priority: str = ""
    priority_value: int = 0
    replicas: int = 1
    max_run_time_seconds: float = 0.0
    user_failure_limit: int | None = None
    infrastructure_failure_limit: int | None = None
    queue: str = ""
    flavor: str = ""
    attempt: int = 0
    attempts: tuple[Attempt, ...] = ()
    pending: PendingInfo | None = None
    right_sizing_hint: str = ""
    admitted_at: datetime | None = None
    queue_wait_seconds: float = 0.0

    @property
    def succeeded(self) -> bool:
        """True when the job ended successfully."""
        return self.state is JobState.SUCCEEDED

    @classmethod
    def from_proto(cls, msg: scheduler_pb2.Job) -> Job:
        """Converts a ``plinth.scheduler.v1.Job`` message."""
        spec = msg.spec
        return cls(
            id=msg.id,
            name=spec.name,
            team=spec.team,
            entrypoint=tuple(spec.entrypoint),
            working_dir=spec.working_dir,
            env=dict(spec.env),
            cpu=spec.resources.cpu,
            memory_bytes=spec.resources.memory_bytes,
            gpu=spec.resources.gpu,
            register_as=spec.register_as,
            state=JobState.from_proto(msg.state),
            created_at=datetime_field(msg, "created_at"),
            started_at=datetime_field(msg, "started_at"),
            finished_at=datetime_field(msg, "finished_at"),
            exit_code=msg.exit_code,
            signal=msg.signal,
            failure_reason=msg.failure_reason,
            mlflow_run_id=msg.mlflow_run_id,
            outputs=dict(msg.outputs),
            priority=msg.priority or spec.priority,
            priority_value=msg.priority_value,
            replicas=spec.replicas or 1,
            max_run_time_seconds=spec.max_run_time_seconds,
            user_failure_limit=_optional_int(spec.retry, "user_failure_limit"),
            infrastructure_failure_limit=_optional_int(spec.retry, "infrastructure_failure_limit"),
            queue=msg.queue,
            flavor=msg.flavor,
            attempt=msg.attempt,
            attempts=tuple(Attempt.from_proto(a) for a in msg.attempts),
            pending=PendingInfo.from_proto(msg.pending) if msg.HasField("pending") else None,
            right_sizing_hint=msg.right_sizing_hint,
            admitted_at=datetime_field(msg, "admitted_at"),
            queue_wait_seconds=msg.queue_wait_seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; timestamps are ISO 8601 strings or None."""
        return {
            "id": self.id,
            "name": self.name,
            "team": self.team,
            "entrypoint": list(self.entrypoint),
            "working_dir": self.working_dir,
            "env": dict(self.env),
            "cpu": self.cpu,
            "memory_bytes": self.memory_bytes,
            "gpu": self.gpu,
            "register_as": self.register_as,
            "state": self.state.value,
            "created_at": iso_or_none(self.created_at),
            "started_at": iso_or_none(self.started_at),
            "finished_at": iso_or_none(self.finished_at),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "failure_reason": self.failure_reason,
            "mlflow_run_id": self.mlflow_run_id,
            "outputs": dict(self.outputs),
            "priority": self.priority,
            "priority_value": self.priority_value,
            "replicas": self.replicas,
            "max_run_time_seconds": self.max_run_time_seconds,
            "user_failure_limit": self.user_failure_limit,
            "infrastructure_failure_limit": self.infrastructure_failure_limit,
            "queue": self.queue,
            "flavor": self.flavor,
            "attempt": self.attempt,
            "attempts": [a.to_dict() for a in self.attempts],
            "pending": self.pending.to_dict() if self.pending is not None else None,
            "right_sizing_hint": self.right_sizing_hint,
            "admitted_at": iso_or_none(self.admitted_at),
            "queue_wait_seconds": self.queue_wait_seconds,
        }


def _optional_int(msg: Any, field_name: str) -> int | None:
    return int(getattr(msg, field_name)) if msg.HasField(field_name) else None


_PROTO_END_REASON_PREFIX = "END_REASON_"


class EndReason(enum.StrEnum):
    """Why an attempt of a job ended (``UNSPECIFIED`` while it runs)."""

    UNSPECIFIED = "UNSPECIFIED"
    EXITED = "EXITED"
    OOM_KILLED = "OOM_KILLED"
    PREEMPTED = "PREEMPTED"
    EVICTED = "EVICTED"
    UNSCHEDULABLE = "UNSCHEDULABLE"
    RUN_TIME_EXCEEDED = "RUN_TIME_EXCEEDED"
    EXECUTOR_LOST = "EXECUTOR_LOST"
    CANCELLED = "CANCELLED"
    LAUNCH_FAILED = "LAUNCH_FAILED"

    @classmethod
    def from_proto(cls, value: int) -> EndReason:
        """Converts a ``plinth.scheduler.v1.EndReason`` number (unknown numbers: UNSPECIFIED)."""
        try:
            name = scheduler_pb2.EndReason.Name(value)  # type: ignore[arg-type]
        except ValueError:
            return cls.UNSPECIFIED
        try:
            return cls(name.removeprefix(_PROTO_END_REASON_PREFIX))
        except ValueError:
            return cls.UNSPECIFIED

    @property
    def text(self) -> str:
        """Lower-case words: ``run time exceeded``; "" while running."""
        return "" if self is EndReason.UNSPECIFIED else self.value.lower().replace("_", " ")


@dataclass(frozen=True)
class Attempt:
    """One run of a job (a job runs again after a preemption, or a failure within its budget).

    Attributes:
        number: 1-based.
        flavor: The resource flavor it was admitted to.
        admitted_at: When it was admitted (UTC), or None.
        started_at: When its process started, or None.
        finished_at: When it ended, or None while it runs.
        end_reason: Why it ended.
        exit_code: The process's exit code (meaningful when ``signal`` is 0).
        signal: The signal that killed it, 0 if none.
        message: How it ended, in words.
        queue_wait_seconds: From queued (or requeued) to admitted.
        run_seconds: How long it ran.
        requested_cpu: Cores asked for, per replica.
        requested_memory_bytes: Memory asked for, per replica.
        requested_gpu: GPUs asked for, per replica.
        peak_memory_bytes: The most memory it used (measured by the executor); 0 if unknown.
        cpu_seconds: User plus system CPU time of its processes.
    """

    number: int
    flavor: str
    admitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    end_reason: EndReason
    exit_code: int
    signal: int
    message: str
    queue_wait_seconds: float
    run_seconds: float
    requested_cpu: float
    requested_memory_bytes: int
    requested_gpu: int
    peak_memory_bytes: int
    cpu_seconds: float

    @classmethod
    def from_proto(cls, msg: scheduler_pb2.Attempt) -> Attempt:
        """Converts a ``plinth.scheduler.v1.Attempt`` message."""
        return cls(
            number=msg.number,
            flavor=msg.flavor,
            admitted_at=datetime_field(msg, "admitted_at"),
            started_at=datetime_field(msg, "started_at"),
            finished_at=datetime_field(msg, "finished_at"),
            end_reason=EndReason.from_proto(msg.end_reason),
            exit_code=msg.exit_code,
            signal=msg.signal,
            message=msg.message,
            queue_wait_seconds=msg.queue_wait_seconds,
            run_seconds=msg.run_seconds,
            requested_cpu=msg.requested.cpu,
            requested_memory_bytes=msg.requested.memory_bytes,
            requested_gpu=msg.requested.gpu,
            peak_memory_bytes=msg.peak_memory_bytes,
            cpu_seconds=msg.cpu_seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "number": self.number,
            "flavor": self.flavor,
            "admitted_at": iso_or_none(self.admitted_at),
            "started_at": iso_or_none(self.started_at),
            "finished_at": iso_or_none(self.finished_at),
            "end_reason": self.end_reason.value,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "message": self.message,
            "queue_wait_seconds": self.queue_wait_seconds,
            "run_seconds": self.run_seconds,
            "requested_cpu": self.requested_cpu,
            "requested_memory_bytes": self.requested_memory_bytes,
            "requested_gpu": self.requested_gpu,
            "peak_memory_bytes": self.peak_memory_bytes,
            "cpu_seconds": self.cpu_seconds,
        }


@dataclass(frozen=True)
class PendingInfo:
    """Where a queued job stands.

    Attributes:
        position_in_queue: 1-based, in admission order within its cluster queue.
        position_in_cohort: 1-based over the pending jobs of the queue's cohort.
        reason: Why it waits, a sentence with numbers.
        estimated_start: When it should start (UTC); None when unknown.
        estimate_basis: How the estimate was made (or why there is none), in words.
    """

    position_in_queue: int
    position_in_cohort: int
    reason: str
    estimated_start: datetime | None
    estimate_basis: str

    @classmethod
    def from_proto(cls, msg: scheduler_pb2.PendingInfo) -> PendingInfo:
        """Converts a ``plinth.scheduler.v1.PendingInfo`` message."""
        return cls(
            position_in_queue=msg.position_in_queue,
            position_in_cohort=msg.position_in_cohort,
            reason=msg.reason,
            estimated_start=datetime_field(msg, "estimated_start"),
            estimate_basis=msg.estimate_basis,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "position_in_queue": self.position_in_queue,
            "position_in_cohort": self.position_in_cohort,
            "reason": self.reason,
            "estimated_start": iso_or_none(self.estimated_start),
            "estimate_basis": self.estimate_basis,
        }


@dataclass(frozen=True)
class QuotaUsage:
    """One resource of one flavor of a cluster queue: its quota and what is used of it.

    Attributes:
        flavor: The resource flavor.
        resource: ``cpu`` (cores), ``memory`` (bytes) or ``gpu``.
        nominal: The queue's nominal quota.
        used: What its admitted jobs hold.
        borrowed: Used above nominal (from the cohort).
        lent: Of its nominal quota, what other queues of the cohort use.
    """

    flavor: str
    resource: str
    nominal: float
    used: float
    borrowed: float
    lent: float

    @classmethod
    def from_proto(cls, msg: scheduler_pb2.QuotaUsage) -> QuotaUsage:
        """Converts a ``plinth.scheduler.v1.QuotaUsage`` message."""
        return cls(msg.flavor, msg.resource, msg.nominal, msg.used, msg.borrowed, msg.lent)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "flavor": self.flavor,
            "resource": self.resource,
            "nominal": self.nominal,
            "used": self.used,
            "borrowed": self.borrowed,
            "lent": self.lent,
        }


@dataclass(frozen=True)
class ClusterQueueStatus:
    """A cluster queue: its teams, cohort, usage against quota, and job counts."""

    name: str
    cohort: str
    teams: tuple[str, ...]
    usage: tuple[QuotaUsage, ...]
    pending: int
    admitted: int

    @classmethod
    def from_proto(cls, msg: scheduler_pb2.ClusterQueueStatus) -> ClusterQueueStatus:
        """Converts a ``plinth.scheduler.v1.ClusterQueueStatus`` message."""
        return cls(
            name=msg.name,
            cohort=msg.cohort,
            teams=tuple(msg.teams),
            usage=tuple(QuotaUsage.from_proto(u) for u in msg.usage),
            pending=msg.pending,
            admitted=msg.admitted,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "name": self.name,
            "cohort": self.cohort,
            "teams": list(self.teams),
            "usage": [u.to_dict() for u in self.usage],
            "pending": self.pending,
            "admitted": self.admitted,
        }


@dataclass(frozen=True)
class PendingJob:
    """A queued job as the queue shows it."""

    job_id: str
    name: str
    team: str
    queue: str
    priority: str
    info: PendingInfo

    @classmethod
    def from_proto(cls, msg: scheduler_pb2.PendingJob) -> PendingJob:
        """Converts a ``plinth.scheduler.v1.PendingJob`` message."""
        return cls(
            job_id=msg.job_id,
            name=msg.name,
            team=msg.team,
            queue=msg.queue,
            priority=msg.priority,
            info=PendingInfo.from_proto(msg.info),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "job_id": self.job_id,
            "name": self.name,
            "team": self.team,
            "queue": self.queue,
            "priority": self.priority,
            **self.info.to_dict(),
        }


@dataclass(frozen=True)
class QueueStatus:
    """The queues a caller may see, and their pending jobs in admission order."""

    queues: tuple[ClusterQueueStatus, ...]
    pending: tuple[PendingJob, ...]

    @classmethod
    def from_proto(cls, msg: scheduler_pb2.QueueStatus) -> QueueStatus:
        """Converts a ``plinth.scheduler.v1.QueueStatus`` message."""
        return cls(
            queues=tuple(ClusterQueueStatus.from_proto(q) for q in msg.queues),
            pending=tuple(PendingJob.from_proto(p) for p in msg.pending),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "queues": [q.to_dict() for q in self.queues],
            "pending": [p.to_dict() for p in self.pending],
        }


@dataclass(frozen=True)
class QueueConfigInfo:
    """The queue configuration in force (or that would be, after a dry run).

    Attributes:
        version: Its version; 0 for the built-in default (nothing applied yet).
        document: The canonical YAML document.
        applied_at: When it was applied (UTC), None for the default.
        applied_by: Who applied it.
        warnings: What the admin should know (e.g. running jobs above a lowered quota).
    """

    version: int
    document: str
    applied_at: datetime | None
    applied_by: str
    warnings: tuple[str, ...]

    @classmethod
    def from_proto(cls, msg: scheduler_pb2.QueueConfigInfo) -> QueueConfigInfo:
        """Converts a ``plinth.scheduler.v1.QueueConfigInfo`` message."""
        return cls(
            version=msg.version,
            document=msg.document,
            applied_at=datetime_field(msg, "applied_at"),
            applied_by=msg.applied_by,
            warnings=tuple(msg.warnings),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict (the document as YAML text)."""
        return {
            "version": self.version,
            "document": self.document,
            "applied_at": iso_or_none(self.applied_at),
            "applied_by": self.applied_by,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Event:
    """One platform event (CloudEvents attributes plus payload) from the gateway's stream.

    Attributes:
        id: CloudEvents id, unique per event.
        type: Event type, e.g. ``plinth.job.finished``.
        source: The service that emitted it.
        subject: What the event is about, e.g. a job id.
        time: When it happened (UTC), None if the producer gave no time.
        team: Owning team, or "".
        data_schema: Full protobuf message name of the payload.
        data_json: The payload in proto3 JSON form, as sent.
        data_bytes: The protobuf-encoded payload, as sent.
        traceparent: W3C trace context of the producing span, or "".
        sequence: Its place in the platform's event stream; ``watch(after_sequence=...)``
            resumes right after it.
    """

    id: str
    type: str
    source: str
    subject: str
    time: datetime | None
    team: str
    data_schema: str
    data_json: str
    data_bytes: bytes = field(repr=False)
    traceparent: str
    sequence: int = 0

    @property
    def data(self) -> dict[str, Any]:
        """The payload parsed from ``data_json``; {} when it is empty or not a JSON object."""
        return json_object(self.data_json)

    @classmethod
    def from_proto(cls, msg: gateway_pb2.Event) -> Event:
        """Converts a ``plinth.gateway.v1.Event`` message."""
        return cls(
            id=msg.id,
            type=msg.type,
            source=msg.source,
            subject=msg.subject,
            time=datetime_field(msg, "time"),
            team=msg.team,
            data_schema=msg.data_schema,
            data_json=msg.data_json,
            data_bytes=msg.data,
            traceparent=msg.traceparent,
            sequence=msg.sequence,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict with the parsed payload under ``data``."""
        return {
            "id": self.id,
            "type": self.type,
            "source": self.source,
            "subject": self.subject,
            "time": iso_or_none(self.time),
            "team": self.team,
            "data_schema": self.data_schema,
            "data": self.data,
            "traceparent": self.traceparent,
            "sequence": self.sequence,
        }


def json_object(text: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object; {} when it is empty, not JSON, or not an object."""
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def datetime_field(msg: Any, field_name: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime; None when unset (or the epoch)."""
    # An unset Timestamp and the epoch both mean "not happened yet": servers that fill every
    # field send zeros rather than leaving it unset.
    if not msg.HasField(field_name):
        return None
    ts: Timestamp = getattr(msg, field_name)
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    when: datetime = ts.ToDatetime(tzinfo=UTC)
    return when


def iso_or_none(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# Kubernetes quantity suffixes that make sense for memory. Lower-case "m" (milli) is left
# out on purpose: "300m" is a classic typo for "300M" and would mean 0.3 bytes.
_MEMORY_UNITS: dict[str, int] = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_MEMORY_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([A-Za-z]*)")
_MEMORY_HINT = "expected bytes or a quantity like 512Mi, 2Gi, 1G, 300M"


def parse_memory(value: int | str) -> int:
    """Converts a memory request to bytes.

    Accepts an int (bytes) or a Kubernetes-style quantity: ``"536870912"``, ``"512Mi"``,
    ``"2Gi"``, ``"1.5Gi"``, ``"1G"``, ``"300M"``. Fractions round up to a whole byte.

    Raises:
        ValueError: the value is negative or not a quantity; the message names ``memory``.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"invalid memory {value!r}: {_MEMORY_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid memory {value!r}: must not be negative")
        return value
    match = _MEMORY_RE.fullmatch(value.strip())
    if match is None or match.group(2) not in _MEMORY_UNITS:
        raise ValueError(f"invalid memory {value!r}: {_MEMORY_HINT}")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:  # pragma: no cover - the regex only lets decimals through
        raise ValueError(f"invalid memory {value!r}: {_MEMORY_HINT}") from None
    scaled = number * _MEMORY_UNITS[match.group(2)]
    return int(scaled.to_integral_value(rounding=ROUND_CEILING))


# --------------------------------------------------------------------------- registry

_RULE_RE = re.compile(r"\s*([A-Za-z0-9_][A-Za-z0-9_.\-/]*)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*")
_RULE_HINT = "expected 'METRIC OP THRESHOLD' with OP one of < <= > >= == !=, e.g. 'rmse < 60'"


def parse_rule(text: str) -> PolicyRule:
    """Reads a promotion rule such as ``"rmse < 60"`` or ``"r2>=0.4"``.

    Args:
        text: ``METRIC OP THRESHOLD``; OP is one of ``< <= > >= == !=``, THRESHOLD a number.

    Returns:
        The rule.

    Raises:
        ValueError: the text is not a rule; the message quotes it.
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid rule {text!r}: {_RULE_HINT}")
    match = _RULE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid rule {text!r}: {_RULE_HINT}")
    metric, op, number = match.groups()
    try:
        threshold = float(number)
    except ValueError:
        raise ValueError(f"invalid rule {text!r}: threshold {number!r} is not a number") from None
    if not math.isfinite(threshold):
        raise ValueError(f"invalid rule {text!r}: threshold must be a finite number")
    return PolicyRule(metric=metric, op=op, threshold=threshold)


@dataclass(frozen=True)
class PolicyRule:
    """A condition on a model version's run metrics, e.g. ``rmse < 60``.

    Attributes:
        metric: Name of a metric the version's run logged.
        op: One of ``< <= > >= == !=``.
        threshold: The number the metric is compared with.
    """

    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str | PolicyRule) -> PolicyRule:
        """Reads ``"rmse < 60"``; see :func:`parse_rule`. A rule passes through unchanged."""
        return text if isinstance(text, PolicyRule) else parse_rule(text)

    @classmethod
    def from_proto(cls, msg: registry_pb2.PolicyRule) -> PolicyRule:
        """Converts a ``plinth.registry.v1.PolicyRule`` message."""
        return cls(metric=msg.metric, op=msg.op, threshold=msg.threshold)

    def to_proto(self) -> registry_pb2.PolicyRule:
        """Returns the ``plinth.registry.v1.PolicyRule`` message."""
        return registry_pb2.PolicyRule(metric=self.metric, op=self.op, threshold=self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {"metric": self.metric, "op": self.op, "threshold": self.threshold}

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {_number_text(self.threshold)}"


@dataclass(frozen=True)
class PromotionPolicy:
    """What a version must satisfy before an alias may point at it.

    Attributes:
        rules: Every rule must hold on the version's run metrics.
        require_approval: A promotion needs an approval: ``approved=True`` (``--approve``) by
            a maintainer promoting, or one recorded with ``models.approve``.
        aliases: The aliases it guards; empty guards every alias.
        require_distinct_approver: Four-eyes: the approval must come from someone other than
            the promoter (recorded beforehand with ``models.approve``).
    """

    rules: tuple[PolicyRule, ...] = ()
    require_approval: bool = False
    aliases: tuple[str, ...] = ()
    require_distinct_approver: bool = False

    @property
    def is_empty(self) -> bool:
        """True when the policy allows every promotion (no rules, no approval)."""
        return not self.rules and not self.require_approval

    @classmethod
    def from_proto(cls, msg: registry_pb2.PromotionPolicy) -> PromotionPolicy:
        """Converts a ``plinth.registry.v1.PromotionPolicy`` message."""
        return cls(
            rules=tuple(PolicyRule.from_proto(rule) for rule in msg.rules),
            require_approval=msg.require_approval,
            aliases=tuple(msg.aliases),
            require_distinct_approver=msg.require_distinct_approver,
        )

    def to_proto(self) -> registry_pb2.PromotionPolicy:
        """Returns the ``plinth.registry.v1.PromotionPolicy`` message."""
        return registry_pb2.PromotionPolicy(
            rules=[rule.to_proto() for rule in self.rules],
            require_approval=self.require_approval,
            aliases=list(self.aliases),
            require_distinct_approver=self.require_distinct_approver,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; rules also as text under ``rules_text``."""
        return {
            "rules": [rule.to_dict() for rule in self.rules],
            "rules_text": [str(rule) for rule in self.rules],
            "require_approval": self.require_approval,
            "aliases": list(self.aliases),
            "require_distinct_approver": self.require_distinct_approver,
        }

    def __str__(self) -> str:
        if self.is_empty:
            return "none"
        parts = [str(rule) for rule in self.rules]
        if self.require_approval and self.require_distinct_approver:
            parts.append("approval by another person required")
        elif self.require_approval:
            parts.append("approval required")
        text = ", ".join(parts)
        if self.aliases:
            text += f" (aliases: {', '.join(self.aliases)})"
        return text


@dataclass(frozen=True)
class Run:
    """An MLflow tracking run, as the registry reports it.

    Attributes:
        run_id: MLflow run id.
        experiment_id: The run's experiment.
        status: MLflow status, e.g. ``"FINISHED"``.
        start_time: Start (UTC), None if unknown.
        end_time: End (UTC), None while running.
        metrics: Latest value of each logged metric.
        params: Logged parameters.
        tags: Run tags.
        artifact_uri: Root of the run's artifacts.
    """

    run_id: str
    experiment_id: str
    status: str
    start_time: datetime | None
    end_time: datetime | None
    metrics: Mapping[str, float] = field(hash=False)
    params: Mapping[str, str] = field(hash=False)
    tags: Mapping[str, str] = field(hash=False)
    artifact_uri: str

    @classmethod
    def from_proto(cls, msg: registry_pb2.Run) -> Run:
        """Converts a ``plinth.registry.v1.Run`` message."""
        return cls(
            run_id=msg.run_id,
            experiment_id=msg.experiment_id,
            status=msg.status,
            start_time=datetime_field(msg, "start_time"),
            end_time=datetime_field(msg, "end_time"),
            metrics=dict(msg.metrics),
            params=dict(msg.params),
            tags=dict(msg.tags),
            artifact_uri=msg.artifact_uri,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; timestamps are ISO 8601 strings or None."""
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "status": self.status,
            "start_time": iso_or_none(self.start_time),
            "end_time": iso_or_none(self.end_time),
            "metrics": dict(self.metrics),
            "params": dict(self.params),
            "tags": dict(self.tags),
            "artifact_uri": self.artifact_uri,
        }


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model: a name, its owner, its aliases and its promotion policy.

    Attributes:
        name: Registered model name.
        team: Owning team.
        description: Free text, or "".
        tags: User tags (reserved ``plinth.*`` tags are not shown).
        aliases: Alias -> version, e.g. ``{"production": "3"}``.
        latest_version: Newest version, or "" if it has none.
        policy: The promotion policy (empty when none is set).
    """

    name: str
    team: str
    description: str
    tags: Mapping[str, str] = field(hash=False)
    aliases: Mapping[str, str] = field(hash=False)
    latest_version: str
    policy: PromotionPolicy

    @classmethod
    def from_proto(cls, msg: registry_pb2.RegisteredModel) -> RegisteredModel:
        """Converts a ``plinth.registry.v1.RegisteredModel`` message."""
        return cls(
            name=msg.name,
            team=msg.team,
            description=msg.description,
            tags=dict(msg.tags),
            aliases=dict(msg.aliases),
            latest_version=msg.latest_version,
            policy=PromotionPolicy.from_proto(msg.policy),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "name": self.name,
            "team": self.team,
            "description": self.description,
            "tags": dict(self.tags),
            "aliases": dict(self.aliases),
            "latest_version": self.latest_version,
            "policy": self.policy.to_dict(),
        }


@dataclass(frozen=True)
class PolicyReport:
    """A model's whole promotion policy, after a change or as stored, and what the registry
    found that may not be meant.

    Attributes:
        model: The registered model, with its policy.
        warnings: e.g. a rule on a metric no version of the model has, naming the closest
            metric names its versions have (``rsme`` for ``rmse``). Not errors: a version
            registered later may log that metric.
    """

    model: RegisteredModel
    warnings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The model's name."""
        return self.model.name

    @property
    def policy(self) -> PromotionPolicy:
        """The whole policy (empty when none is set)."""
        return self.model.policy

    @classmethod
    def from_proto(
        cls, msg: registry_pb2.SetPolicyResponse | registry_pb2.GetPolicyResponse
    ) -> PolicyReport:
        """Converts a ``SetPolicyResponse`` or ``GetPolicyResponse`` message."""
        return cls(model=RegisteredModel.from_proto(msg.model), warnings=tuple(msg.warnings))

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict: the model's name, its policy and the warnings."""
        return {"name": self.name, "policy": self.policy.to_dict(), "warnings": list(self.warnings)}


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model.

    Attributes:
        name: Registered model name.
        version: Version number, as a string (``"3"``).
        team: Owning team.
        run_id: The MLflow run that produced it.
        source: Artifact URI of the model.
        status: MLflow status, e.g. ``"READY"``.
        aliases: Aliases pointing at this version.
        tags: Version tags, including lineage (``plinth.job_id``, ``plinth.run_id``, ...).
        metrics: The run's metrics.
        created_at: Registration time (UTC).
        model_id: The MLflow LoggedModel it was registered from, or "".
        approvals: The approvals recorded for it, oldest first.
        history: Every time an alias moved to it, who promoted and who approved, oldest first.
    """

    name: str
    version: str
    team: str
    run_id: str
    source: str
    status: str
    aliases: tuple[str, ...]
    tags: Mapping[str, str] = field(hash=False)
    metrics: Mapping[str, float] = field(hash=False)
    created_at: datetime | None
    model_id: str
    approvals: tuple[Approval, ...] = ()
    history: tuple[PromotionRecord, ...] = ()

    @property
    def job_id(self) -> str:
        """The Plinth job that registered it, or "" (from the ``plinth.job_id`` tag)."""
        return self.tags.get("plinth.job_id", "")

    @classmethod
    def from_proto(cls, msg: registry_pb2.ModelVersion) -> ModelVersion:
        """Converts a ``plinth.registry.v1.ModelVersion`` message."""
        return cls(
            name=msg.name,
            version=msg.version,
            team=msg.team,
            run_id=msg.run_id,
            source=msg.source,
            status=msg.status,
            aliases=tuple(msg.aliases),
            tags=dict(msg.tags),
            metrics=dict(msg.metrics),
            created_at=datetime_field(msg, "created_at"),
            model_id=msg.model_id,
            approvals=tuple(Approval.from_proto(a) for a in msg.approvals),
            history=tuple(PromotionRecord.from_proto(p) for p in msg.history),
        )

    def last_promotion(self, alias: str) -> PromotionRecord | None:
        """The latest move of ``alias`` to this version, or None."""
        moves = [record for record in self.history if record.alias == alias]
        return moves[-1] if moves else None

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; timestamps are ISO 8601 strings or None."""
        return {
            "name": self.name,
            "version": self.version,
            "team": self.team,
            "run_id": self.run_id,
            "source": self.source,
            "status": self.status,
            "aliases": list(self.aliases),
            "tags": dict(self.tags),
            "metrics": dict(self.metrics),
            "created_at": iso_or_none(self.created_at),
            "model_id": self.model_id,
            "approvals": [approval.to_dict() for approval in self.approvals],
            "history": [record.to_dict() for record in self.history],
        }


@dataclass(frozen=True)
class Approval:
    """Someone's approval of a version for an alias.

    Attributes:
        alias: The alias it approves the version for, e.g. ``"production"``.
        approved_by: Who approved.
        approved_at: When (UTC).
        comment: Why, or "".
    """

    alias: str
    approved_by: str
    approved_at: datetime | None
    comment: str = ""

    @classmethod
    def from_proto(cls, msg: registry_pb2.Approval) -> Approval:
        """Converts a ``plinth.registry.v1.Approval`` message."""
        return cls(
            alias=msg.alias,
            approved_by=msg.approved_by,
            approved_at=datetime_field(msg, "approved_at"),
            comment=msg.comment,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; the time is an ISO 8601 string or None."""
        return {
            "alias": self.alias,
            "approved_by": self.approved_by,
            "approved_at": iso_or_none(self.approved_at),
            "comment": self.comment,
        }


@dataclass(frozen=True)
class PromotionRecord:
    """One move of an alias to a version, from the version's history.

    Attributes:
        alias: The alias that moved.
        promoted_by: Who moved it.
        approved_by: Whose approval it carried, "" when none was required.
        promoted_at: When (UTC).
        previous_version: The version the alias pointed to before, or "".
    """

    alias: str
    promoted_by: str
    approved_by: str
    promoted_at: datetime | None
    previous_version: str = ""

    @classmethod
    def from_proto(cls, msg: registry_pb2.Promotion) -> PromotionRecord:
        """Converts a ``plinth.registry.v1.Promotion`` message."""
        return cls(
            alias=msg.alias,
            promoted_by=msg.promoted_by,
            approved_by=msg.approved_by,
            promoted_at=datetime_field(msg, "promoted_at"),
            previous_version=msg.previous_version,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; the time is an ISO 8601 string or None."""
        return {
            "alias": self.alias,
            "promoted_by": self.promoted_by,
            "approved_by": self.approved_by,
            "promoted_at": iso_or_none(self.promoted_at),
            "previous_version": self.previous_version,
        }


@dataclass(frozen=True)
class VersionApproval:
    """What ``models.approve`` recorded: the approval, and the version with all its approvals.

    Attributes:
        version: The approved version.
        approval: The approval just recorded.
    """

    version: ModelVersion
    approval: Approval

    @classmethod
    def from_proto(cls, msg: registry_pb2.ApproveModelVersionResponse) -> VersionApproval:
        """Converts a ``plinth.registry.v1.ApproveModelVersionResponse`` message."""
        return cls(
            version=ModelVersion.from_proto(msg.version),
            approval=Approval.from_proto(msg.approval),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {"version": self.version.to_dict(), "approval": self.approval.to_dict()}


@dataclass(frozen=True)
class Promotion:
    """The outcome of moving an alias.

    Attributes:
        version: The version the alias points to now.
        previous_version: The version it pointed to before, or "".
    """

    version: ModelVersion
    previous_version: str

    @classmethod
    def from_proto(cls, msg: registry_pb2.SetAliasResponse) -> Promotion:
        """Converts a ``plinth.registry.v1.SetAliasResponse`` message."""
        return cls(
            version=ModelVersion.from_proto(msg.version), previous_version=msg.previous_version
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {"version": self.version.to_dict(), "previous_version": self.previous_version}


# --------------------------------------------------------------------------- serving

_DEPLOYMENT_STATE_PREFIX = "DEPLOYMENT_STATE_"


class DeploymentState(enum.StrEnum):
    """Where a deployment is relative to the version its alias points to."""

    UNSPECIFIED = "UNSPECIFIED"
    PENDING = "PENDING"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    #: The serving engine is down; serving restarts (or waits for) it and reloads the version.
    UNAVAILABLE = "UNAVAILABLE"

    @classmethod
    def from_proto(cls, value: int) -> DeploymentState:
        """Converts a ``plinth.serving.v1.DeploymentState`` number (unknown -> UNSPECIFIED)."""
        try:
            name = serving_pb2.DeploymentState.Name(value)
        except ValueError:
            return cls.UNSPECIFIED
        try:
            return cls(name.removeprefix(_DEPLOYMENT_STATE_PREFIX))
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True)
class VersionTraffic:
    """One version of a deployment's split, with what the inference data plane measured over
    the deployment's SLO window.

    Attributes:
        version: The registered model version.
        percent: Its share of requests.
        canary: Not the serving (stable) version: rolled back when it breaks the SLO.
        measured: False when no data plane statistics exist (the Python path, or not yet).
        requests_per_second: Requests it answered per second.
        error_rate_percent: Errors per 100 requests.
        p99_ms: 99th percentile latency in milliseconds.
    """

    version: str
    percent: int
    canary: bool = False
    measured: bool = False
    requests_per_second: float = 0.0
    error_rate_percent: float = 0.0
    p99_ms: float = 0.0

    @classmethod
    def from_proto(cls, msg: serving_pb2.VersionTraffic) -> VersionTraffic:
        """Converts a ``plinth.serving.v1.VersionTraffic`` message."""
        return cls(
            version=msg.version,
            percent=msg.percent,
            canary=msg.canary,
            measured=msg.measured,
            requests_per_second=msg.requests_per_second,
            error_rate_percent=msg.error_rate_percent,
            p99_ms=msg.p99_ms,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "version": self.version,
            "percent": self.percent,
            "canary": self.canary,
            "measured": self.measured,
            "requests_per_second": self.requests_per_second,
            "error_rate_percent": self.error_rate_percent,
            "p99_ms": self.p99_ms,
        }


@dataclass(frozen=True)
class Deployment:
    """A deployment: a registered model's alias served on Triton under a name.

    Attributes:
        name: Deployment name; also the model name in KServe v2 inference calls.
        team: Owning team.
        model_name: The registered model it serves.
        alias: The alias it follows, e.g. ``"production"``.
        max_batch_size: Triton's max batch size (0: the server default).
        max_queue_delay_us: Dynamic batching queue delay in µs (0: no dynamic batching).
        instance_count: CPU model instances (0: one).
        state: PENDING, LOADING, READY or FAILED, relative to ``target_version``.
        serving_version: The version answering requests now, or "".
        loading_version: The version being loaded, or "".
        target_version: The version the alias points to, as last heard, or "".
        last_error: Why the last load failed, or "".
        created_at: Creation time (UTC).
        updated_at: Last change (UTC).
        shared_with: Teams whose members may call it for inference (read-only).
        traffic: The split answering now, the serving version first.
        pending_traffic: A requested split (version -> percent) whose versions still load.
        slo: ``max_error_rate_percent``, ``max_p99_ms``, ``window_seconds``: when a canary is
            rolled back.
        max_concurrency: Requests the data plane lets in at once (0: unlimited).
        max_queue: Requests that may wait for those (0: none wait).
    """

    name: str
    team: str
    model_name: str
    alias: str
    max_batch_size: int
    max_queue_delay_us: int
    instance_count: int
    state: DeploymentState
    serving_version: str
    loading_version: str
    target_version: str
    last_error: str
    created_at: datetime | None
    updated_at: datetime | None
    shared_with: tuple[str, ...] = ()
    traffic: tuple[VersionTraffic, ...] = ()
    pending_traffic: Mapping[str, int] = field(default_factory=dict)
    slo: Mapping[str, float] = field(default_factory=dict)
    max_concurrency: int = 0
    max_queue: int = 0

    @property
    def split(self) -> dict[str, int]:
        """Version -> percent of requests it answers now."""
        return {t.version: t.percent for t in self.traffic}

    @property
    def is_ready(self) -> bool:
        """True when it serves the version its alias points to."""
        return self.state is DeploymentState.READY

    @classmethod
    def from_proto(cls, msg: serving_pb2.Deployment) -> Deployment:
        """Converts a ``plinth.serving.v1.Deployment`` message."""
        return cls(
            name=msg.name,
            team=msg.team,
            model_name=msg.model_name,
            alias=msg.alias,
            max_batch_size=msg.triton.max_batch_size,
            max_queue_delay_us=msg.triton.max_queue_delay_microseconds,
            instance_count=msg.triton.instance_count,
            state=DeploymentState.from_proto(msg.state),
            serving_version=msg.serving_version,
            loading_version=msg.loading_version,
            target_version=msg.target_version,
            last_error=msg.last_error,
            created_at=datetime_field(msg, "created_at"),
            updated_at=datetime_field(msg, "updated_at"),
            shared_with=tuple(msg.shared_with),
            traffic=tuple(VersionTraffic.from_proto(t) for t in msg.traffic),
            pending_traffic={s.version: s.percent for s in msg.pending_traffic},
            slo={
                "max_error_rate_percent": msg.slo.max_error_rate_percent,
                "max_p99_ms": msg.slo.max_p99_ms,
                "window_seconds": msg.slo.window_seconds,
            },
            max_concurrency=msg.limits.max_concurrency,
            max_queue=msg.limits.max_queue,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; timestamps are ISO 8601 strings or None."""
        return {
            "name": self.name,
            "team": self.team,
            "model_name": self.model_name,
            "alias": self.alias,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "instance_count": self.instance_count,
            "state": self.state.value,
            "serving_version": self.serving_version,
            "loading_version": self.loading_version,
            "target_version": self.target_version,
            "last_error": self.last_error,
            "created_at": iso_or_none(self.created_at),
            "updated_at": iso_or_none(self.updated_at),
            "shared_with": list(self.shared_with),
            "traffic": [t.to_dict() for t in self.traffic],
            "pending_traffic": dict(self.pending_traffic),
            "slo": dict(self.slo),
            "max_concurrency": self.max_concurrency,
            "max_queue": self.max_queue,
        }


# --------------------------------------------------------------------------- features

_FIELD_STATUS_PREFIX = "FIELD_STATUS_"


class FieldStatus(enum.StrEnum):
    """Whether an online feature value was found for an entity row."""

    UNSPECIFIED = "UNSPECIFIED"
    PRESENT = "PRESENT"
    NOT_FOUND = "NOT_FOUND"
    NULL_VALUE = "NULL_VALUE"
    OUTSIDE_MAX_AGE = "OUTSIDE_MAX_AGE"

    @classmethod
    def from_proto(cls, value: int) -> FieldStatus:
        """Converts a ``plinth.features.v1.FieldStatus`` number (unknown -> UNSPECIFIED)."""
        try:
            name = features_pb2.FieldStatus.Name(value)
        except ValueError:
            return cls.UNSPECIFIED
        try:
            return cls(name.removeprefix(_FIELD_STATUS_PREFIX))
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True)
class FeatureView:
    """A Feast feature view.

    Attributes:
        name: View name; features are addressed as ``"<view>:<feature>"``.
        entities: Names of the entities it is keyed by.
        features: Names of its features.
        ttl_seconds: How old a value may be and still be served (0: no limit).
        online: Whether it is materialized to the online store.
        join_keys: The entity columns rows are looked up by, e.g. ``("driver_id",)``.
        batch_source: Name of the data source it is materialized from, or "".
        push_source: Name of the push source feeding it, or "".
        tags: The view's tags.
        data_until: The newest data online for it: its latest materialization's end or push
            (None: neither yet).
    """

    name: str
    entities: tuple[str, ...]
    features: tuple[str, ...]
    ttl_seconds: float
    online: bool
    join_keys: tuple[str, ...] = ()
    batch_source: str = ""
    push_source: str = ""
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    data_until: datetime | None = None

    @classmethod
    def from_proto(cls, msg: features_pb2.FeatureView) -> FeatureView:
        """Converts a ``plinth.features.v1.FeatureView`` message."""
        return cls(
            name=msg.name,
            entities=tuple(msg.entities),
            features=tuple(msg.features),
            ttl_seconds=msg.ttl_seconds,
            online=msg.online,
            join_keys=tuple(msg.join_keys),
            batch_source=msg.batch_source,
            push_source=msg.push_source,
            tags=dict(msg.tags),
            data_until=datetime_field(msg, "data_until"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "name": self.name,
            "entities": list(self.entities),
            "features": list(self.features),
            "ttl_seconds": self.ttl_seconds,
            "online": self.online,
            "join_keys": list(self.join_keys),
            "batch_source": self.batch_source,
            "push_source": self.push_source,
            "tags": dict(self.tags),
            "data_until": iso_or_none(self.data_until),
        }


@dataclass(frozen=True)
class AppliedRepository:
    """What applying a feature repository registered.

    Attributes:
        entities: Entity names.
        feature_views: Batch, stream and push-fed feature view names.
        on_demand_feature_views: On-demand feature view names.
        feature_services: Feature service names.
        data_sources: Data source names.
        deleted: ``"<kind>:<name>"`` of the objects this apply removed.
        warnings: What the service found wrong without refusing the apply, e.g. a data
            source whose file it cannot read (materializing that view would fail).
    """

    entities: tuple[str, ...]
    feature_views: tuple[str, ...]
    on_demand_feature_views: tuple[str, ...] = ()
    feature_services: tuple[str, ...] = ()
    data_sources: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, msg: features_pb2.ApplyRepositoryResponse) -> AppliedRepository:
        """Converts a ``plinth.features.v1.ApplyRepositoryResponse`` message."""
        return cls(
            entities=tuple(msg.entities),
            feature_views=tuple(msg.feature_views),
            on_demand_feature_views=tuple(msg.on_demand_feature_views),
            feature_services=tuple(msg.feature_services),
            data_sources=tuple(msg.data_sources),
            deleted=tuple(msg.deleted),
            # Servers older than the field send none; getattr keeps this SDK working with them.
            warnings=tuple(getattr(msg, "warnings", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "entities": list(self.entities),
            "feature_views": list(self.feature_views),
            "on_demand_feature_views": list(self.on_demand_feature_views),
            "feature_services": list(self.feature_services),
            "data_sources": list(self.data_sources),
            "deleted": list(self.deleted),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Materialization:
    """A completed materialization run.

    Attributes:
        feature_views: The views it loaded into the online store.
        duration_seconds: How long it took on the server.
        start_time: Start of the event-time window (incremental: the earliest among the
            views), None if the server did not say.
        end_time: End of the event-time window, None if the server did not say.
    """

    feature_views: tuple[str, ...]
    duration_seconds: float
    start_time: datetime | None = None
    end_time: datetime | None = None

    @classmethod
    def from_proto(cls, msg: features_pb2.MaterializeResponse) -> Materialization:
        """Converts a ``plinth.features.v1.MaterializeResponse`` message."""
        return cls(
            feature_views=tuple(msg.feature_views),
            duration_seconds=msg.duration_seconds,
            start_time=datetime_field(msg, "start_time"),
            end_time=datetime_field(msg, "end_time"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; timestamps are ISO 8601 strings or None."""
        return {
            "feature_views": list(self.feature_views),
            "duration_seconds": self.duration_seconds,
            "start_time": iso_or_none(self.start_time),
            "end_time": iso_or_none(self.end_time),
        }


@dataclass(frozen=True)
class OnlineRow:
    """Online feature values of one entity row.

    Attributes:
        values: Column name -> value: the entity keys first (as the caller sent them), then
            each feature under its reference (``"view:feature"``) in the server's order.
            Missing values are None. Protobuf numbers are doubles, so an INT64 feature reads
            as a float (``12.0``); integers beyond 2**53 come as decimal strings.
        statuses: Column name -> :class:`FieldStatus` for every column the server returned.
        event_timestamps: Column name -> event time (UTC) of the value, None if unknown.
    """

    values: Mapping[str, Any] = field(hash=False)
    statuses: Mapping[str, FieldStatus] = field(hash=False)
    event_timestamps: Mapping[str, datetime | None] = field(hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict with ``values``, ``statuses`` and ``event_timestamps``."""
        return {
            "values": dict(self.values),
            "statuses": {name: status.value for name, status in self.statuses.items()},
            "event_timestamps": {
                name: iso_or_none(ts) for name, ts in self.event_timestamps.items()
            },
        }


def online_rows_from_proto(
    msg: features_pb2.GetOnlineFeaturesResponse, entity_rows: Sequence[Mapping[str, Any]]
) -> list[OnlineRow]:
    """Turns the column-wise online response into one :class:`OnlineRow` per entity row.

    Protobuf numbers are doubles, so an entity key comes back as ``1001.0``; the caller's own
    value (``1001``) is kept for entity key columns instead.
    """
    rows: list[dict[str, Any]] = [dict(row) for row in entity_rows]
    statuses: list[dict[str, FieldStatus]] = [{} for _ in entity_rows]
    stamps: list[dict[str, datetime | None]] = [{} for _ in entity_rows]
    for column in msg.columns:
        for index in range(len(rows)):
            if column.name in entity_rows[index]:
                value = entity_rows[index][column.name]
            elif index < len(column.values):
                value = value_to_python(column.values[index])
            else:
                value = None
            rows[index][column.name] = value
            if index < len(column.statuses):
                statuses[index][column.name] = FieldStatus.from_proto(column.statuses[index])
            if index < len(column.event_timestamps):
                stamps[index][column.name] = _timestamp_or_none(column.event_timestamps[index])
    return [
        OnlineRow(values=values, statuses=status, event_timestamps=stamp)
        for values, status, stamp in zip(rows, statuses, stamps, strict=True)
    ]


def value_to_python(value: Value) -> Any:
    """Converts a ``google.protobuf.Value`` to None, bool, float, str, list or dict."""
    if value.WhichOneof("kind") is None:
        return None  # unset: json_format would refuse it
    return json_format.MessageToDict(value)


_MAX_EXACT_INT = 2**53  # protobuf numbers are doubles


def plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Copies an entity row with numpy scalars turned into Python ones (``np.int64`` -> int)."""
    return {key: _plain(value) for key, value in row.items()}


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        return value.item()  # numpy scalars
    return value


def to_struct(row: Mapping[str, Any]) -> Struct:
    """Converts an entity row (``{"driver_id": 1001}``) to a ``google.protobuf.Struct``.

    Raises:
        ValueError: a key is not a str, a value is not a JSON scalar, or an int is too large
            to travel as a protobuf number (send it as a str instead).
    """
    fields: dict[str, Any] = {}
    for key, given in row.items():
        if not isinstance(key, str):
            raise ValueError(f"entity key {key!r} must be a str")
        value = _plain(given)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_EXACT_INT:
            raise ValueError(
                f"entity value {key}={value} is too large to send exactly; pass it as a str"
            )
        if value is not None and not isinstance(value, bool | int | float | str):
            raise ValueError(
                f"entity value {key}={value!r} must be a str, int, float, bool or None"
            )
        fields[key] = value
    return json_format.ParseDict(fields, Struct())


def _timestamp_or_none(ts: Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    when: datetime = ts.ToDatetime(tzinfo=UTC)
    return when


def _number_text(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < _MAX_EXACT_INT:
        return str(int(value))
    return repr(value)


# --------------------------------------------------------------------------- identity

_ROLE_PREFIX = "ROLE_"


class Role(enum.StrEnum):
    """A member's role in a team; each may do what the roles before it may.

    ``viewer`` reads; ``developer`` submits and cancels jobs, registers versions, creates
    deployments and promotes to unprotected aliases; ``maintainer`` also promotes to protected
    aliases such as ``production``, approves, sets policies and deletes.
    """

    VIEWER = "viewer"
    DEVELOPER = "developer"
    MAINTAINER = "maintainer"

    @classmethod
    def from_proto(cls, value: int) -> Role | None:
        """Converts a ``plinth.gateway.v1.Role`` number; None for UNSPECIFIED or unknown."""
        try:
            name = gateway_pb2.Role.Name(value)
        except ValueError:
            return None
        try:
            return cls(name.removeprefix(_ROLE_PREFIX).lower())
        except ValueError:
            return None

    def to_proto(self) -> int:
        """Returns the ``plinth.gateway.v1.Role`` number."""
        return int(gateway_pb2.Role.Value(_ROLE_PREFIX + self.value.upper()))

    @classmethod
    def parse(cls, text: str | Role) -> Role:
        """Reads ``"developer"``, ``"DEVELOPER"`` or ``"ROLE_DEVELOPER"``.

        Raises:
            ValueError: the text names no role.
        """
        if isinstance(text, Role):
            return text
        try:
            return cls(text.strip().lower().removeprefix("role_"))
        except ValueError:
            known = ", ".join(role.value for role in cls)
            raise ValueError(f"unknown role {text!r}; expected one of {known}") from None


def _role_text(role: Role | None) -> str | None:
    return role.value if role is not None else None


@dataclass(frozen=True)
class Identity:
    """Who the gateway takes the caller for (``whoami``).

    Attributes:
        name: The user or service-account name.
        kind: ``"user"`` or ``"service_account"``.
        admin: A platform admin (every team, teams, members, others' keys, audit).
        teams: Team -> the caller's role in it.
        via: How the credential was proven: ``"api_key"`` or ``"oidc"``.
        key_id: The API key's public id, when the credential is one; "" otherwise.
    """

    name: str
    kind: str
    admin: bool
    teams: Mapping[str, Role] = field(hash=False)
    via: str
    key_id: str = ""

    @classmethod
    def from_proto(cls, msg: gateway_pb2.WhoAmIResponse) -> Identity:
        """Converts a ``plinth.gateway.v1.WhoAmIResponse`` message."""
        teams = {entry.team: Role.from_proto(entry.role) for entry in msg.teams}
        return cls(
            name=msg.name,
            kind=msg.kind,
            admin=msg.admin,
            teams={team: role for team, role in sorted(teams.items()) if role is not None},
            via=msg.via,
            key_id=msg.key_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; roles as their names."""
        return {
            "name": self.name,
            "kind": self.kind,
            "admin": self.admin,
            "teams": {team: role.value for team, role in self.teams.items()},
            "via": self.via,
            "key_id": self.key_id,
        }


@dataclass(frozen=True)
class Team:
    """A team: the unit that owns jobs, models, deployments and feature views.

    Attributes:
        name: Team name (a DNS label, as a job's ``team``).
        description: Free text, or "".
        created_at: Creation time (UTC).
        created_by: Who created it.
        member_count: How many members it has.
        my_role: The caller's role in it; None for an admin who is no member.
    """

    name: str
    description: str
    created_at: datetime | None
    created_by: str
    member_count: int
    my_role: Role | None

    @classmethod
    def from_proto(cls, msg: gateway_pb2.Team) -> Team:
        """Converts a ``plinth.gateway.v1.Team`` message."""
        return cls(
            name=msg.name,
            description=msg.description,
            created_at=datetime_field(msg, "created_at"),
            created_by=msg.created_by,
            member_count=msg.member_count,
            my_role=Role.from_proto(msg.my_role),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; the time is an ISO 8601 string or None."""
        return {
            "name": self.name,
            "description": self.description,
            "created_at": iso_or_none(self.created_at),
            "created_by": self.created_by,
            "member_count": self.member_count,
            "my_role": _role_text(self.my_role),
        }


@dataclass(frozen=True)
class Member:
    """A team member and their role.

    Attributes:
        team: The team.
        user: The user or service-account name.
        role: Their role in the team.
        added_at: When they were added or their role last changed (UTC).
        added_by: Who did it.
    """

    team: str
    user: str
    role: Role | None
    added_at: datetime | None
    added_by: str

    @classmethod
    def from_proto(cls, msg: gateway_pb2.Member) -> Member:
        """Converts a ``plinth.gateway.v1.Member`` message."""
        return cls(
            team=msg.team,
            user=msg.user,
            role=Role.from_proto(msg.role),
            added_at=datetime_field(msg, "added_at"),
            added_by=msg.added_by,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; the time is an ISO 8601 string or None."""
        return {
            "team": self.team,
            "user": self.user,
            "role": _role_text(self.role),
            "added_at": iso_or_none(self.added_at),
            "added_by": self.added_by,
        }


@dataclass(frozen=True)
class ApiKey:
    """An API key without its secret (what listing shows).

    Attributes:
        id: The key's public id; ``keys.revoke`` takes it.
        name: What it is for, e.g. ``"laptop"`` or ``"ci"``.
        owner: The user or service account it acts as.
        kind: ``"user"`` or ``"service_account"``.
        admin: The key acts as a platform admin.
        created_at: Creation time (UTC).
        created_by: Who created it.
        expires_at: When it stops working (UTC); None: never.
        last_used_at: When it was last used, to the minute (UTC); None: never.
        revoked_at: When it was revoked (UTC); None while it is valid.
    """

    id: str
    name: str
    owner: str
    kind: str
    admin: bool
    created_at: datetime | None
    created_by: str
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        """True once the key was revoked."""
        return self.revoked_at is not None

    @classmethod
    def from_proto(cls, msg: gateway_pb2.ApiKey) -> ApiKey:
        """Converts a ``plinth.gateway.v1.ApiKey`` message."""
        return cls(
            id=msg.id,
            name=msg.name,
            owner=msg.owner,
            kind=msg.kind,
            admin=msg.admin,
            created_at=datetime_field(msg, "created_at"),
            created_by=msg.created_by,
            expires_at=datetime_field(msg, "expires_at"),
            last_used_at=datetime_field(msg, "last_used_at"),
            revoked_at=datetime_field(msg, "revoked_at"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; times are ISO 8601 strings or None."""
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "kind": self.kind,
            "admin": self.admin,
            "created_at": iso_or_none(self.created_at),
            "created_by": self.created_by,
            "expires_at": iso_or_none(self.expires_at),
            "last_used_at": iso_or_none(self.last_used_at),
            "revoked_at": iso_or_none(self.revoked_at),
        }


@dataclass(frozen=True)
class NewApiKey:
    """A key just created: the only time its secret is available.

    Attributes:
        key: The key's details.
        secret: The whole key (``plk_...``) to pass as a bearer token; never in a repr. The
            platform keeps only a hash of it, so it cannot be shown again.
    """

    key: ApiKey
    secret: str = field(repr=False)

    @classmethod
    def from_proto(cls, msg: gateway_pb2.CreateApiKeyResponse) -> NewApiKey:
        """Converts a ``plinth.gateway.v1.CreateApiKeyResponse`` message."""
        return cls(key=ApiKey.from_proto(msg.key), secret=msg.secret)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict, with the secret."""
        return {**self.key.to_dict(), "secret": self.secret}


@dataclass(frozen=True)
class AuditRecord:
    """One audited call: a mutating call or a denial.

    Attributes:
        id: The record's number (newer records have larger ones).
        time: When the call was made (UTC).
        principal: Who made it ("" when the credential was rejected).
        principal_kind: ``"user"``, ``"service_account"``, ``"service"`` or "".
        method: The gRPC method path, or ``"HTTP <verb> <route>"``.
        permission: The permission it needed, e.g. ``"models.promote"``.
        team: The team it was about, where the request names one.
        resource: What it was about (a job id, ``model@alias``, ...).
        outcome: ``"OK"`` or the status code name, e.g. ``"PERMISSION_DENIED"``.
        message: The denial's message, or "".
        trace_id: The trace of the call, to find it in the logs.
    """

    id: int
    time: datetime | None
    principal: str
    principal_kind: str
    method: str
    permission: str
    team: str
    resource: str
    outcome: str
    message: str
    trace_id: str

    @property
    def denied(self) -> bool:
        """True when the call did not succeed."""
        return self.outcome != "OK"

    @classmethod
    def from_proto(cls, msg: gateway_pb2.AuditRecord) -> AuditRecord:
        """Converts a ``plinth.gateway.v1.AuditRecord`` message."""
        return cls(
            id=msg.id,
            time=datetime_field(msg, "time"),
            principal=msg.principal,
            principal_kind=msg.principal_kind,
            method=msg.method,
            permission=msg.permission,
            team=msg.team,
            resource=msg.resource,
            outcome=msg.outcome,
            message=msg.message,
            trace_id=msg.trace_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; the time is an ISO 8601 string or None."""
        return {
            "id": self.id,
            "time": iso_or_none(self.time),
            "principal": self.principal,
            "principal_kind": self.principal_kind,
            "method": self.method,
            "permission": self.permission,
            "team": self.team,
            "resource": self.resource,
            "outcome": self.outcome,
            "message": self.message,
            "trace_id": self.trace_id,
        }
