"""The one domain error hierarchy of Plinth.

Services raise these; exactly one server interceptor (``plinth_common.grpc_server``) maps them
to gRPC status codes. Nothing here imports grpc, so domain code stays transport-neutral.
"""

from __future__ import annotations

from typing import Any


class PlinthError(Exception):
    """Base of every domain error.

    Attributes:
        message: a sentence for the caller, safe to show.
        details: structured fields (the offending field, the id, ...), for logs and clients.
    """

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidArgument(PlinthError):
    """The request is malformed; ``field`` names what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)
        self.field = field


class NotFound(PlinthError):
    """The named object does not exist."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} not found", kind=kind, name=name)


class AlreadyExists(PlinthError):
    """An object of that name exists already."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} already exists", kind=kind, name=name)


class FailedPrecondition(PlinthError):
    """The object is not in a state that allows the operation."""


class PermissionDenied(PlinthError):
    """The caller may not do this."""


class Unavailable(PlinthError):
    """A dependency (engine, peer service, broker) cannot be reached right now; retry later."""
