"""The one domain error hierarchy of Plinth.

Services raise these; exactly one server interceptor (``plinth_common.grpc_server``) maps them
to gRPC status codes and rich details (``google.rpc.ErrorInfo`` with :attr:`PlinthError.reason`,
plus ``BadRequest``, ``ResourceInfo`` or ``RetryInfo`` where they apply). Nothing here imports
grpc, so domain code stays transport-neutral.

Reasons are stable strings that clients branch on (the SDK maps them to exception classes); the
README lists them. Add a reason rather than changing one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "REASONS",
    "AlreadyExists",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PlinthError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]

#: Every reason a Plinth service sends in ``ErrorInfo.reason``, with what it means.
REASONS: Mapping[str, str] = {
    "INVALID_FIELD": "a request field is malformed; BadRequest names the field",
    "MALFORMED_REQUEST": "the request bytes do not decode as the method's message",
    "NOT_FOUND": "the named resource does not exist (or is not visible to the caller)",
    "ALREADY_EXISTS": "a resource of that name exists already",
    "FAILED_PRECONDITION": "the resource is not in a state that allows the call",
    "POLICY_VIOLATION": "a promotion policy rule does not hold for the version",
    "APPROVAL_REQUIRED": "the promotion policy requires approval",
    "PERMISSION_DENIED": "the caller may not do this",
    "UNAUTHENTICATED": "credentials are missing or were rejected",
    "RESOURCE_EXHAUSTED": "a rate limit or quota was hit; RetryInfo says when to retry",
    "DEPENDENCY_UNAVAILABLE": "a service or engine behind the one called cannot be reached; "
    "metadata 'dependency' names it, RetryInfo says when to retry",
    "INTERNAL": "an unexpected server error; metadata 'trace_id' finds it in the logs",
}


class PlinthError(Exception):
    """Base of every domain error.

    Args:
        message: a sentence for the caller, safe to show.
        reason: the stable reason (a key of :data:`REASONS`); the class's default when omitted.
        **details: structured fields (the offending field, the id, ...), sent to clients as
            ``ErrorInfo.metadata`` (as strings) and written to logs.
    """

    default_reason: ClassVar[str] = "INTERNAL"
    #: Seconds after which a retry may succeed; None when retrying the same call cannot help.
    retry_after_s: float | None = None

    def __init__(self, message: str, *, reason: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.details = details

    @property
    def metadata(self) -> dict[str, str]:
        """The details as ``ErrorInfo.metadata``: strings only, empty values left out."""
        return {k: str(v) for k, v in self.details.items() if v is not None and v != ""}


class InvalidArgument(PlinthError):
    """The request is malformed; ``field`` names what is wrong (a BadRequest field violation).

    Args:
        field: the offending field (a path such as ``spec.resources.gpu``).
        problem: what is wrong with it, as a sentence.
        reason: the stable reason (``INVALID_FIELD`` when omitted).
        violations: for a whole document refused at once, every ``(field, problem)`` found;
            the message lists them all and the rich status carries one ``BadRequest``
            field violation each (``field``/``problem`` then summarise, e.g. ``config``,
            ``3 problems``). Empty: the one violation is ``(field, problem)``.
    """

    default_reason = "INVALID_FIELD"

    def __init__(
        self,
        field: str,
        problem: str,
        *,
        reason: str | None = None,
        violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        listed = "".join(f"; {f}: {p}" for f, p in violations)
        super().__init__(f"{field}: {problem}{listed}", reason=reason, field=field)
        self.field = field
        self.problem = problem
        #: Every ``(field, problem)``, at least the one of ``field`` and ``problem``.
        self.violations: tuple[tuple[str, str], ...] = tuple(violations) or ((field, problem),)


class NotFound(PlinthError):
    """The named object does not exist (a ResourceInfo names it).

    Args:
        kind: what was looked for (``job``, ``model``, ``deployment``).
        name: its name.
        hint: a sentence that helps, for example the closest existing names.
    """

    default_reason = "NOT_FOUND"

    def __init__(self, kind: str, name: str, *, hint: str = "") -> None:
        message = f"{kind} {name!r} not found" + (f"; {hint}" if hint else "")
        super().__init__(message, kind=kind, name=name)
        self.kind = kind
        self.name = name


class AlreadyExists(PlinthError):
    """An object of that name exists already (a ResourceInfo names it)."""

    default_reason = "ALREADY_EXISTS"

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} already exists", kind=kind, name=name)
        self.kind = kind
        self.name = name


class FailedPrecondition(PlinthError):
    """The object is not in a state that allows the operation."""

    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(PlinthError):
    """The caller may not do this."""

    default_reason = "PERMISSION_DENIED"


class Unauthenticated(PlinthError):
    """The caller's credentials are missing or were rejected."""

    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(PlinthError):
    """A rate limit or quota was hit; retry after :attr:`retry_after_s`."""

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class Unavailable(PlinthError):
    """A dependency (engine, peer service, broker) cannot be reached right now; retry later.

    Args:
        message: what is unavailable, in words the caller understands.
        dependency: the thing that is down (``registry service``, ``serving engine``, ``MLflow``),
            sent as ``ErrorInfo.metadata['dependency']``.
        retry_after_s: when a retry may succeed (sent as ``RetryInfo``).
    """

    default_reason = "DEPENDENCY_UNAVAILABLE"

    def __init__(
        self, message: str, *, dependency: str = "", retry_after_s: float = 1.0, **details: Any
    ) -> None:
        super().__init__(message, dependency=dependency, **details)
        self.dependency = dependency
        self.retry_after_s = retry_after_s
