"""Calling one method with fuzzed bytes, judging the outcome, and checking the platform's health."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plinth_common.devstack import LocalPlatform
from plinth_common.rich_status import details_of

# PLINTH_TEST_*: tests/conftest.py clears every other PLINTH_ variable before the tests run.
EXAMPLES_VARIABLE = "PLINTH_TEST_FUZZ_EXAMPLES"
# A unary call slower than this is a hang (the slowest honest one, a Feast apply, takes ~2 s).
UNARY_DEADLINE_S = 20.0
# A stream is read for this long at most: a valid watch or a followed log legitimately waits.
STREAM_DEADLINE_S = 3.0
STREAM_MESSAGES = 32  # read at most this many messages of a stream, then cancel it
# Initial metadata the gateway's WatchEvents sends once the subscription is in place.
WATCH_LIVE = ("plinth-watch", "live")
# Codes that are the platform's bug, whatever the request.
NEVER = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


def examples(default: int) -> int:
    """The example budget per method: ``$PLINTH_TEST_FUZZ_EXAMPLES`` if set, else ``default``."""
    raw = os.environ.get(EXAMPLES_VARIABLE, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True)
class Outcome:
    """How a call ended: its status code, the rich status reason, the message."""

    code: grpc.StatusCode
    reason: str = ""
    message: str = ""
    waiting: bool = False  # a stream that was still open (legitimately waiting) when read off

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason} {self.message[:300]!r}"


def path_of(method: MethodDescriptor) -> str:
    """The gRPC path: ``/package.Service/Method``."""
    return f"/{method.containing_service.full_name}/{method.name}"


def _failed(exc: grpc.RpcError) -> Outcome:
    # What a call raises is also its grpc.Call (code, details, trailers); the stubs only say RpcError.
    call: grpc.Call = exc  # type: ignore[assignment]
    details = details_of(call.trailing_metadata())
    return Outcome(call.code(), details.reason, call.details() or "")


def call(channel: grpc.Channel, method: MethodDescriptor, raw: bytes) -> Outcome:
    """Sends ``raw`` as the request of ``method`` and says how the call ended.

    Unary calls get UNARY_DEADLINE_S. A stream is read for at most STREAM_DEADLINE_S and
    STREAM_MESSAGES messages; a watch that reports itself live is cancelled at once (it would
    follow for ever), and so is a stream that had to be cut off: both are ``waiting``.
    """
    path = path_of(method)
    if not method.server_streaming:
        try:
            channel.unary_unary(path)(raw, timeout=UNARY_DEADLINE_S)
        except grpc.RpcError as exc:
            return _failed(exc)
        return Outcome(grpc.StatusCode.OK)
    stream = channel.unary_stream(path)(raw, timeout=STREAM_DEADLINE_S)
    try:
        if WATCH_LIVE in tuple(stream.initial_metadata() or ()):
            return Outcome(grpc.StatusCode.OK, waiting=True)
        for _ in itertools.islice(stream, STREAM_MESSAGES):
            pass
    except grpc.RpcError as exc:
        outcome = _failed(exc)
        if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Outcome(grpc.StatusCode.OK, waiting=True)
        return outcome
    finally:
        stream.cancel()
    return Outcome(grpc.StatusCode.OK)


def unhealthy(platform: LocalPlatform) -> list[str]:
    """What is wrong with the platform: exited processes, services not SERVING (empty: fine)."""
    problems = []
    for service in platform.config.services:
        process = platform.processes.get(service)
        if process is None or not process.alive:
            described = process.exit_description() if process is not None else "not started"
            problems.append(f"{service} {described}:\n{platform.log_tail(service)}")
            continue
        with grpc.insecure_channel(platform.address(service)) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5
                )
            except grpc.RpcError as exc:
                problems.append(f"{service} health check failed: {exc}")
                continue
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            problems.append(f"{service} is {status}")
    return problems
