"""Errors the SDK raises; every gRPC failure becomes one of these.

Catch :class:`PlinthClientError` for any server-side failure, or a subclass for one status code.
``str(err)`` is one readable line, ``"NOT_FOUND: job j-123 not found"``.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "DeploymentFailed",
    "DeploymentWaitTimeout",
    "FailedPrecondition",
    "InvalidArgument",
    "JobWaitTimeout",
    "NotFound",
    "PermissionDenied",
    "PlinthClientError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


class PlinthClientError(Exception):
    """A call to the Plinth gateway failed.

    Attributes:
        code: The gRPC status code name, e.g. ``"NOT_FOUND"``.
        message: A readable, one-line explanation.
        details: The status details exactly as the server (or gRPC) sent them.
    """

    def __init__(self, code: str, message: str, *, details: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = message if details is None else details


class InvalidArgument(PlinthClientError):
    """The request was malformed (INVALID_ARGUMENT)."""


class NotFound(PlinthClientError):
    """The named object does not exist (NOT_FOUND)."""


class AlreadyExists(PlinthClientError):
    """The object to create exists already (ALREADY_EXISTS)."""


class FailedPrecondition(PlinthClientError):
    """The object is in the wrong state for this call (FAILED_PRECONDITION)."""


class PermissionDenied(PlinthClientError):
    """The caller may not do this (PERMISSION_DENIED)."""


class Unauthenticated(PlinthClientError):
    """The caller's identity was missing or rejected (UNAUTHENTICATED)."""


class ResourceExhausted(PlinthClientError):
    """A quota or rate limit was hit (RESOURCE_EXHAUSTED)."""


class Unavailable(PlinthClientError):
    """The gateway, or a service behind it, could not be reached (UNAVAILABLE)."""


class DeadlineExceeded(Unavailable):
    """The gateway did not answer within the call's timeout (DEADLINE_EXCEEDED)."""


class JobWaitTimeout(PlinthClientError, TimeoutError):
    """``jobs.wait`` gave up before the job reached a terminal state.

    Attributes:
        job: The last state of the job seen before giving up.
    """

    def __init__(self, message: str, *, job: object) -> None:
        super().__init__("DEADLINE_EXCEEDED", message)
        self.job = job


class DeploymentWaitTimeout(PlinthClientError, TimeoutError):
    """``deployments.wait_ready`` gave up before the deployment was ready.

    Attributes:
        deployment: The last state of the deployment seen before giving up.
    """

    def __init__(self, message: str, *, deployment: object) -> None:
        super().__init__("DEADLINE_EXCEEDED", message)
        self.deployment = deployment


class DeploymentFailed(PlinthClientError):
    """``deployments.wait_ready`` saw the version it waited for fail to load.

    Attributes:
        deployment: The deployment as last seen; ``last_error`` says why.
    """

    def __init__(self, message: str, *, deployment: object) -> None:
        super().__init__("FAILED_PRECONDITION", message)
        self.deployment = deployment


_BY_CODE: dict[grpc.StatusCode, type[PlinthClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}

# Substrings of the details gRPC itself writes when the connection, not the server, failed.
# A server that answers UNAVAILABLE (say, the scheduler behind the gateway is down) writes
# its own details, which are kept instead of blaming the gateway.
_TRANSPORT_MARKERS = (
    "failed to connect",
    "errors resolving",
    "dns resolution failed",
    "connection refused",
    "connection reset",
    "socket closed",
    "broken pipe",
    "empty address list",
    "keepalive watchdog",
)


def from_rpc_error(err: grpc.RpcError, *, target: str) -> PlinthClientError:
    """Converts a failed gRPC call into the matching :class:`PlinthClientError` subclass.

    Args:
        err: The error a stub raised (it is also a ``grpc.Call``).
        target: The gateway address the channel dials, named in connection errors.
    """
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details: str = (err.details() if hasattr(err, "details") else None) or ""
    cls = _BY_CODE.get(code, PlinthClientError)
    message = _readable_message(code, details, target)
    return cls(code.name, message, details=details)


def _readable_message(code: grpc.StatusCode, details: str, target: str) -> str:
    gateway = f"the Plinth gateway at {target}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {gateway} in time (is `make run` running?)"
    if code is grpc.StatusCode.UNAVAILABLE:
        if not details or any(m in details.lower() for m in _TRANSPORT_MARKERS):
            return f"cannot reach {gateway} (is `make run` running?)"
        return f"{details} (reported by {gateway})"
    # Details can span lines (stack-like text from a proxy); the CLI promises one line.
    return " ".join(details.split()) or code.name.lower().replace("_", " ")
