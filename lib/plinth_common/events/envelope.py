"""CloudEvents 1.0 in binary mode over NATS headers, with protobuf (or JSON) payloads.

The event type and the NATS subject are the same string, ``plinth.<domain>.<what>``; the
catalog below maps each to its payload message in ``proto/plinth/events/v1``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from plinth.events.v1 import events_pb2
from plinth.gateway.v1 import gateway_pb2

SPEC_VERSION = "1.0"
PROTOBUF = "application/protobuf"
JSON = "application/json"

CATALOG: dict[str, type[Message]] = {
    "plinth.job.submitted": events_pb2.JobSubmitted,
    "plinth.job.admitted": events_pb2.JobAdmitted,
    "plinth.job.started": events_pb2.JobStarted,
    "plinth.job.preempted": events_pb2.JobPreempted,
    "plinth.job.requeued": events_pb2.JobRequeued,
    "plinth.job.retrying": events_pb2.JobRetrying,
    "plinth.job.cancelled": events_pb2.JobCancelled,
    "plinth.job.finished": events_pb2.JobFinished,
    "plinth.model.version_created": events_pb2.ModelVersionCreated,
    "plinth.model.promoted": events_pb2.ModelPromoted,
    "plinth.deployment.ready": events_pb2.DeploymentReady,
    "plinth.deployment.failed": events_pb2.DeploymentFailed,
    "plinth.deployment.traffic_changed": events_pb2.DeploymentTrafficChanged,
    "plinth.features.materialized": events_pb2.FeaturesMaterialized,
    "plinth.audit.recorded": gateway_pb2.AuditRecord,
}
_TYPE_BY_MESSAGE = {cls.DESCRIPTOR.full_name: name for name, cls in CATALOG.items()}


def event_type_of(message: Message) -> str:
    """The event type (and subject) that carries ``message``."""
    try:
        return _TYPE_BY_MESSAGE[message.DESCRIPTOR.full_name]
    except KeyError:
        raise ValueError(f"{message.DESCRIPTOR.full_name} is not an event payload") from None


class MalformedEvent(ValueError):
    """A message on the bus that is not a well-formed Plinth CloudEvent."""


@dataclass(frozen=True, kw_only=True)
class CloudEvent:
    """One event: CloudEvents attributes plus the encoded payload.

    Attributes:
        extensions: further ``ce-`` attributes (``team``) and trace headers (``traceparent``).
    """

    id: str
    type: str
    source: str
    subject: str
    time: datetime
    data: bytes
    content_type: str = PROTOBUF
    extensions: Mapping[str, str] = field(default_factory=dict)

    @property
    def team(self) -> str:
        """The owning team (the ``ce-team`` extension), or ''."""
        return self.extensions.get("team", "")

    @property
    def dataschema(self) -> str:
        """Full name of the payload message."""
        return CATALOG[self.type].DESCRIPTOR.full_name if self.type in CATALOG else ""

    def headers(self) -> dict[str, str]:
        """NATS headers in CloudEvents binary mode; ``Nats-Msg-Id`` = ``ce-id`` for deduplication."""
        headers = {
            "ce-specversion": SPEC_VERSION,
            "ce-id": self.id,
            "ce-type": self.type,
            "ce-source": self.source,
            "ce-subject": self.subject,
            "ce-time": self.time.isoformat().replace("+00:00", "Z"),
            "ce-dataschema": self.dataschema,
            "content-type": self.content_type,
            "Nats-Msg-Id": self.id,
        }
        for key, value in self.extensions.items():
            headers[key if key in ("traceparent", "tracestate") else f"ce-{key}"] = value
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None, data: bytes) -> CloudEvent:
        """Parses a NATS message's headers and body.

        Raises:
            MalformedEvent: a required attribute is missing or the time is not ISO 8601.
        """
        headers = headers or {}
        missing = [k for k in ("ce-id", "ce-type", "ce-source", "ce-time") if not headers.get(k)]
        if missing:
            raise MalformedEvent(f"missing CloudEvents headers: {', '.join(missing)}")
        try:
            time = datetime.fromisoformat(headers["ce-time"].replace("Z", "+00:00"))
        except ValueError:
            raise MalformedEvent(f"ce-time is not ISO 8601: {headers['ce-time']!r}") from None
        extensions = {
            key[3:] if key.startswith("ce-") else key: value
            for key, value in headers.items()
            if (key.startswith("ce-") and key[3:] not in _CORE)
            or key in ("traceparent", "tracestate")
        }
        return cls(
            id=headers["ce-id"],
            type=headers["ce-type"],
            source=headers["ce-source"],
            subject=headers.get("ce-subject", ""),
            time=time,
            data=data,
            content_type=headers.get("content-type", PROTOBUF),
            extensions=extensions,
        )

    def payload(self) -> Message:
        """Decodes the payload into its catalog message.

        Raises:
            MalformedEvent: unknown type or undecodable payload.
        """
        message_type = CATALOG.get(self.type)
        if message_type is None:
            raise MalformedEvent(f"unknown event type {self.type!r}")
        message = message_type()
        try:
            if self.content_type.startswith(JSON):
                json_format.Parse(self.data.decode("utf-8"), message, ignore_unknown_fields=True)
            else:
                message.ParseFromString(self.data)
        except (DecodeError, json_format.ParseError, ValueError) as exc:  # ValueError: bad UTF-8
            raise MalformedEvent(f"cannot decode {self.type} payload: {exc}") from None
        return message


_CORE = {"specversion", "id", "type", "source", "subject", "time", "dataschema"}


def message_json(message: Message) -> str:
    """A payload in the proto3 JSON form events use (compact, proto field names)."""
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True)


def new_event(
    message: Message,
    *,
    source: str,
    subject: str,
    team: str = "",
    content_type: str = PROTOBUF,
    extensions: Mapping[str, str] | None = None,
) -> CloudEvent:
    """Builds a fresh event (new id, current time) for ``message``."""
    data = (
        message_json(message).encode()
        if content_type.startswith(JSON)
        else message.SerializeToString()
    )
    ext = dict(extensions or {})
    if team:
        ext["team"] = team
    return CloudEvent(
        id=str(uuid.uuid4()),
        type=event_type_of(message),
        source=source,
        subject=subject,
        time=datetime.now(UTC),
        data=data,
        content_type=content_type,
        extensions=ext,
    )
