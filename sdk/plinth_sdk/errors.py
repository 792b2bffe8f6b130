"""Errors the SDK raises; every gRPC failure becomes one of these.

Catch :class:`PlinthClientError` for any failure, a status-code class (:class:`NotFound`,
:class:`Unavailable`, ...) for one status code, or a reason class where a client branches on
what happened: :class:`ApprovalRequired`, :class:`PolicyViolation`,
:class:`DependencyUnavailable`, :class:`GatewayUnreachable`, :class:`MalformedRequest`. Reason
classes derive from their status-code class, so older ``except`` clauses keep working.

The class follows the ``google.rpc.ErrorInfo.reason`` a Plinth server sends (see
``plinth_common.errors.REASONS``); only a reply without one (an old server, a proxy, the
channel itself) is classified by its status code.

``str(err)`` is one readable line, ``"NOT_FOUND: job 'j-123' not found"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import ClassVar, NamedTuple

import grpc

from plinth_common import errors as domain_errors
from plinth_common.rich_status import RichDetails, details_of

__all__ = [
    "AlreadyExists",
    "ApprovalRequired",
    "DeadlineExceeded",
    "DependencyUnavailable",
    "DeploymentFailed",
    "DeploymentWaitTimeout",
    "FailedPrecondition",
    "FieldViolation",
    "GatewayUnreachable",
    "Internal",
    "InvalidArgument",
    "JobWaitTimeout",
    "MalformedRequest",
    "NotFound",
    "PermissionDenied",
    "PlinthClientError",
    "PolicyViolation",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_domain_error",
    "from_rpc_error",
    "refused_locally",
    "reworded",
]

#: ``ErrorInfo.domain`` of errors the SDK raises itself, before sending anything.
SDK_DOMAIN = "sdk.plinth"


class FieldViolation(NamedTuple):
    """One invalid request field (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str


class PlinthClientError(Exception):
    """A call to the Plinth gateway failed.

    Attributes:
        code: The gRPC status code name, e.g. ``"NOT_FOUND"``.
        message: A readable, one-line explanation naming the real culprit.
        details: The status message exactly as the server (or gRPC) sent it.
        reason: ``ErrorInfo.reason`` (``"APPROVAL_REQUIRED"``, ...), "" when none was sent.
        domain: ``ErrorInfo.domain``, the service that raised it (``"registry.plinth"``).
        metadata: ``ErrorInfo.metadata``: structured facts (``dependency``, ``field``, ...).
        field_violations: The invalid fields a ``BadRequest`` named.
        resource: ``(type, name)`` of a ``ResourceInfo``, or None.
        retry_after_s: Seconds after which retrying may succeed (``RetryInfo``), or None.
    """

    #: The reason this class stands for; "" for the status-code classes.
    reason_code: ClassVar[str] = ""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: str | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        resource: tuple[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = message if details is None else details
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = field_violations
        self.resource = resource
        self.retry_after_s = retry_after_s


class InvalidArgument(PlinthClientError):
    """The request was malformed (INVALID_ARGUMENT); ``field_violations`` says where."""


class MalformedRequest(InvalidArgument):
    """The request's bytes did not decode as its message (reason MALFORMED_REQUEST): a client
    and server built from different protos."""

    reason_code = "MALFORMED_REQUEST"


class NotFound(PlinthClientError):
    """The named object does not exist (NOT_FOUND); ``resource`` names it."""


class AlreadyExists(PlinthClientError):
    """The object to create exists already (ALREADY_EXISTS)."""


class FailedPrecondition(PlinthClientError):
    """The object is in the wrong state for this call (FAILED_PRECONDITION)."""


class PolicyViolation(FailedPrecondition):
    """A promotion policy rule does not hold for the version (reason POLICY_VIOLATION); the
    message names the rule and the metric's value."""

    reason_code = "POLICY_VIOLATION"


class ApprovalRequired(FailedPrecondition):
    """The promotion policy requires approval (reason APPROVAL_REQUIRED): promote again with
    ``approved=True`` (``--approve`` on the command line)."""

    reason_code = "APPROVAL_REQUIRED"


class PermissionDenied(PlinthClientError):
    """The caller may not do this (PERMISSION_DENIED)."""


class Unauthenticated(PlinthClientError):
    """The caller's identity was missing or rejected (UNAUTHENTICATED)."""


class ResourceExhausted(PlinthClientError):
    """A quota or rate limit was hit (RESOURCE_EXHAUSTED); retry after ``retry_after_s``."""


class Unavailable(PlinthClientError):
    """The gateway, or a service behind it, could not be reached (UNAVAILABLE)."""


class DependencyUnavailable(Unavailable):
    """The gateway answered, but a service or engine behind it is down (reason
    DEPENDENCY_UNAVAILABLE); :attr:`dependency` names it, ``retry_after_s`` says when to retry."""

    reason_code = "DEPENDENCY_UNAVAILABLE"

    @property
    def dependency(self) -> str:
        """What is down: ``"registry service"``, ``"serving engine"``, ``"MLflow"``, ... or ""."""
        return self.metadata.get("dependency", "")


class GatewayUnreachable(Unavailable):
    """The gateway itself could not be reached: nothing answered at the address."""


class DeadlineExceeded(Unavailable):
    """The gateway did not answer within the call's timeout (DEADLINE_EXCEEDED)."""


class Internal(PlinthClientError):
    """An unexpected server error (INTERNAL); :attr:`trace_id` finds it in the server logs."""

    reason_code = "INTERNAL"

    @property
    def trace_id(self) -> str:
        """The trace id the server logged the failure under, or ""."""
        return self.metadata.get("trace_id", "")


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
    grpc.StatusCode.INTERNAL: Internal,
}

_BY_REASON: dict[str, type[PlinthClientError]] = {
    cls.reason_code: cls
    for cls in (
        MalformedRequest,
        PolicyViolation,
        ApprovalRequired,
        DependencyUnavailable,
        Internal,
    )
}

# Substrings of the details gRPC itself writes when the connection, not a server, failed. Only
# read for a reply without a reason: a Plinth server always sends one.
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
    text: str = (err.details() if hasattr(err, "details") else None) or ""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    rich = details_of(trailers)
    cls = _class_of(code, rich, text)
    return cls(
        code.name,
        _readable_message(code, rich, text, target=target, unreachable=cls is GatewayUnreachable),
        details=text,
        reason=rich.reason,
        domain=rich.domain,
        metadata=rich.metadata,
        field_violations=tuple(FieldViolation(*pair) for pair in rich.field_violations),
        resource=rich.resource,
        retry_after_s=rich.retry_after_s,
    )


def from_domain_error(err: domain_errors.InvalidArgument) -> InvalidArgument:
    """The SDK error for a request the SDK refused before sending it (a malformed name, checked
    with ``plinth_common.names`` as the server would), shaped as the server's answer."""
    return InvalidArgument(
        "INVALID_ARGUMENT",
        err.message,
        reason=err.reason,
        domain=SDK_DOMAIN,
        metadata=err.metadata,
        field_violations=(FieldViolation(err.field, err.problem),),
    )


def reworded(err: PlinthClientError, message: str) -> PlinthClientError:
    """``err`` with a new :attr:`~PlinthClientError.message` (and ``str(err)``); the class and
    every other attribute stay."""
    err.message = message
    err.args = (f"{err.code}: {message}",)
    return err


@contextlib.contextmanager
def refused_locally() -> Iterator[None]:
    """Turns a ``plinth_common.names`` check that fails inside the block into the SDK's
    :class:`InvalidArgument`, so a malformed name fails before a round trip, with the server's
    own words (the field and the bad value)."""
    try:
        yield
    except domain_errors.InvalidArgument as err:
        raise from_domain_error(err) from None


def _class_of(code: grpc.StatusCode, rich: RichDetails, text: str) -> type[PlinthClientError]:
    by_code = _BY_CODE.get(code, PlinthClientError)
    by_reason = _BY_REASON.get(rich.reason)
    # A reason class is used only where it agrees with the status code, so that
    # ``except FailedPrecondition`` still catches every FAILED_PRECONDITION.
    if by_reason is not None and issubclass(by_reason, by_code):
        return by_reason
    if code is grpc.StatusCode.UNAVAILABLE and not rich.reason and _is_transport_failure(text):
        return GatewayUnreachable
    return by_code


def _is_transport_failure(text: str) -> bool:
    lowered = text.lower()
    return not text or any(marker in lowered for marker in _TRANSPORT_MARKERS)


def _readable_message(
    code: grpc.StatusCode, rich: RichDetails, text: str, *, target: str, unreachable: bool
) -> str:
    gateway = f"the Plinth gateway at {target}"
    one_line = " ".join(text.split())
    if unreachable:
        return f"cannot reach {gateway} (is `make run` running?)"
    if not rich.reason:
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no answer from {gateway} in time (is `make run` running?)"
        if code is grpc.StatusCode.UNAVAILABLE:
            return f"{one_line} (reported by {gateway})"
        message = one_line or code.name.lower().replace("_", " ")
        # A rate limit answers with RetryInfo alone; when to retry is the useful part of it.
        if rich.retry_after_s is not None:
            message += f" (retry in {rich.retry_after_s:g} s)"
        return message
    message = _dependency_message(rich.metadata.get("dependency", ""), one_line) or one_line
    message = message or code.name.lower().replace("_", " ")
    if rich.retry_after_s is not None:
        message += f" (retry in {rich.retry_after_s:g} s)"
    return message


def _dependency_message(dependency: str, server_text: str) -> str:
    """``the registry service is unavailable``, keeping the server's words when they add more
    than the name of what is down."""
    if not dependency:
        return ""
    # A proper noun (``MLflow``) takes no article; ``registry service`` does.
    named = dependency if " " not in dependency and dependency[0].isupper() else f"the {dependency}"
    summary = f"{named} is unavailable"
    if server_text and dependency.lower() not in server_text.lower():
        return f"{summary}: {server_text}"
    return summary
