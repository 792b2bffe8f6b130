"""What the gateway answers when a forwarded call fails."""

from __future__ import annotations

import grpc
import pytest

from plinth_common import errors
from plinth_common.grpc_server import UpstreamStatus, status_for
from plinth_common.rich_status import DETAILS_KEY, status_of
from services.gateway.proxy import forwarded_error


def _failure(
    code: grpc.StatusCode, details: str, *trailers: tuple[str, bytes]
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)


def test_callers_own_deadline_stays_deadline_exceeded() -> None:
    error = forwarded_error(
        _failure(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        "scheduler",
        caller_deadline=True,
    )
    assert status_for(error) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_gateway_default_deadline_names_the_slow_upstream() -> None:
    error = forwarded_error(
        _failure(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        "registry",
        caller_deadline=False,
    )
    assert isinstance(error, errors.Unavailable) and error.dependency == "registry service"
    assert "did not answer in time" in error.message


@pytest.mark.parametrize("caller_deadline", [True, False])
def test_unreachable_upstream_is_unavailable_naming_it(caller_deadline: bool) -> None:
    error = forwarded_error(
        _failure(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"),
        "registry",
        caller_deadline=caller_deadline,
    )
    assert isinstance(error, errors.Unavailable) and error.dependency == "registry service"
    assert "failed to connect" not in error.message


def test_upstream_rich_status_passes_through() -> None:
    refused = errors.InvalidArgument("alias", "'latest' is reserved")
    raw = status_of(
        refused, code=grpc.StatusCode.INVALID_ARGUMENT, domain="registry.plinth"
    ).SerializeToString()
    error = forwarded_error(
        _failure(grpc.StatusCode.INVALID_ARGUMENT, refused.message, (DETAILS_KEY, raw)),
        "registry",
        caller_deadline=False,
    )
    assert isinstance(error, UpstreamStatus) and error.rich.raw == raw
    assert (status_for(error), error.message) == (grpc.StatusCode.INVALID_ARGUMENT, refused.message)
