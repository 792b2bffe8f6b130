"""Failed gRPC calls as a client sees them, built in-process from domain errors."""

from __future__ import annotations

import grpc

from plinth_common import errors as domain
from plinth_common.rich_status import DETAILS_KEY, status_of

__all__ = ["FakeRpcError", "rpc_error_of"]

_CODES = {
    domain.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    domain.NotFound: grpc.StatusCode.NOT_FOUND,
    domain.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    domain.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    domain.Unavailable: grpc.StatusCode.UNAVAILABLE,
    domain.PlinthError: grpc.StatusCode.INTERNAL,
}


class FakeRpcError(grpc.RpcError):
    """What a stub raises: a status code, its message and the trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, bytes], ...] = ()
    ) -> None:
        super().__init__(details)
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers


def rpc_error_of(
    error: domain.PlinthError, *, code: grpc.StatusCode | None = None, domain_name: str = "x.plinth"
) -> FakeRpcError:
    """The error a client sees when a Plinth server raised ``error`` (the interceptor's form)."""
    code = code or next(c for t, c in _CODES.items() if isinstance(error, t))
    status = status_of(error, code=code, domain=domain_name)
    return FakeRpcError(code, error.message, ((DETAILS_KEY, status.SerializeToString()),))
