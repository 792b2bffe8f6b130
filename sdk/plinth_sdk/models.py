"""Typed values the SDK returns, converted from the generated protobuf messages.

Callers of the SDK never see protobuf: every RPC result becomes one of the frozen dataclasses
here, with Python types (``datetime`` in UTC, ``tuple``, ``dict``, :class:`JobState`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from plinth.gateway.v1 import gateway_pb2
from plinth.scheduler.v1 import scheduler_pb2

__all__ = ["Event", "Job", "JobState", "parse_memory"]

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
            created_at=_datetime_or_none(msg, "created_at"),
            started_at=_datetime_or_none(msg, "started_at"),
            finished_at=_datetime_or_none(msg, "finished_at"),
            exit_code=msg.exit_code,
            signal=msg.signal,
            failure_reason=msg.failure_reason,
            mlflow_run_id=msg.mlflow_run_id,
            outputs=dict(msg.outputs),
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
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "failure_reason": self.failure_reason,
            "mlflow_run_id": self.mlflow_run_id,
            "outputs": dict(self.outputs),
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

    @property
    def data(self) -> dict[str, Any]:
        """The payload parsed from ``data_json``; {} when it is empty or not a JSON object."""
        if not self.data_json:
            return {}
        try:
            parsed = json.loads(self.data_json)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    @classmethod
    def from_proto(cls, msg: gateway_pb2.Event) -> Event:
        """Converts a ``plinth.gateway.v1.Event`` message."""
        return cls(
            id=msg.id,
            type=msg.type,
            source=msg.source,
            subject=msg.subject,
            time=_datetime_or_none(msg, "time"),
            team=msg.team,
            data_schema=msg.data_schema,
            data_json=msg.data_json,
            data_bytes=msg.data,
            traceparent=msg.traceparent,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict with the parsed payload under ``data``."""
        return {
            "id": self.id,
            "type": self.type,
            "source": self.source,
            "subject": self.subject,
            "time": _iso(self.time),
            "team": self.team,
            "data_schema": self.data_schema,
            "data": self.data,
            "traceparent": self.traceparent,
        }


def _datetime_or_none(msg: Any, field_name: str) -> datetime | None:
    # An unset Timestamp and the epoch both mean "not happened yet": servers that fill every
    # field send zeros rather than leaving it unset.
    if not msg.HasField(field_name):
        return None
    ts: Timestamp = getattr(msg, field_name)
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    when: datetime = ts.ToDatetime(tzinfo=timezone.utc)
    return when


def _iso(value: datetime | None) -> str | None:
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
