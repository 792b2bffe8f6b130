"""Domain errors as ``google.rpc.Status`` with rich details, and back.

The server side (:func:`status_of`) is what the one interceptor sends; the client side
(:func:`error_info_of`, :func:`details_of`) is what the SDK and the services that call each
other read. The wire form is the standard one: the serialized ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer, which every gRPC language's status library decodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from plinth_common import errors

__all__ = [
    "DETAILS_KEY",
    "RichDetails",
    "details_of",
    "status_of",
]

#: The trailer that carries the serialized ``google.rpc.Status``.
DETAILS_KEY = "grpc-status-details-bin"


def status_of(
    error: errors.PlinthError, *, code: grpc.StatusCode, domain: str
) -> status_pb2.Status:
    """The ``google.rpc.Status`` a client receives for ``error``.

    Args:
        error: the domain error.
        code: its status code (the interceptor's mapping).
        domain: the service that raised it, as ``ErrorInfo.domain`` (``scheduler.plinth``).
    """
    status = status_pb2.Status(code=code.value[0], message=error.message)
    extras: list[Message] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
    ]
    if isinstance(error, errors.InvalidArgument):
        extras.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=problem)
                    for field, problem in error.violations
                ]
            )
        )
    if isinstance(error, errors.NotFound | errors.AlreadyExists):
        extras.append(
            error_details_pb2.ResourceInfo(
                resource_type=error.kind, resource_name=error.name, description=error.message
            )
        )
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(round(error.retry_after_s * 1000))
        extras.append(error_details_pb2.RetryInfo(retry_delay=delay))
    for extra in extras:
        packed = any_pb2.Any()
        packed.Pack(extra)
        status.details.append(packed)
    return status


@dataclass(frozen=True)
class RichDetails:
    """What a failed call's rich status says, decoded.

    Attributes:
        reason: ``ErrorInfo.reason`` ("" when the server sent none: not a Plinth server).
        domain: ``ErrorInfo.domain``, the service that raised it.
        metadata: ``ErrorInfo.metadata``.
        field_violations: ``(field, description)`` pairs from ``BadRequest``.
        resource: ``(type, name)`` from ``ResourceInfo``, or None.
        retry_after_s: ``RetryInfo``'s delay in seconds, or None.
        raw: the serialized status, to pass on unchanged.
    """

    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: tuple[tuple[str, str], ...] = ()
    resource: tuple[str, str] | None = None
    retry_after_s: float | None = None
    raw: bytes = b""


def details_of(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> RichDetails:
    """Decodes the rich status of a failed call from its trailing metadata (empty if none)."""
    raw = next((v for k, v in trailing_metadata or () if k == DETAILS_KEY), b"")
    if not isinstance(raw, bytes) or not raw:
        return RichDetails()
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except DecodeError:
        return RichDetails()
    return _decoded(status.details, raw)


def _decoded(details: Sequence[any_pb2.Any], raw: bytes) -> RichDetails:
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    resource = error_details_pb2.ResourceInfo()
    retry = error_details_pb2.RetryInfo()
    seen: set[str] = set()
    for packed in details:
        for message in (info, bad, resource, retry):
            if packed.Is(message.DESCRIPTOR) and packed.Unpack(message):
                seen.add(message.DESCRIPTOR.name)
    return RichDetails(
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        field_violations=tuple((v.field, v.description) for v in bad.field_violations),
        resource=(resource.resource_type, resource.resource_name)
        if "ResourceInfo" in seen
        else None,
        retry_after_s=retry.retry_delay.ToMilliseconds() / 1000 if "RetryInfo" in seen else None,
        raw=raw,
    )
