"""The in-flight bound of a process: a real GrpcServer on an ephemeral port with a handler that
blocks until released. The call past the limit answers RESOURCE_EXHAUSTED at once with
RetryInfo (through the one error interceptor); a sustained overload queues nothing; streams are
counted apart; health stays answerable while the server is full."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from plinth_common.grpc_server import GrpcServer
from plinth_common.overload import InFlight, OverloadInterceptor
from plinth_common.rich_status import details_of

LIMIT = 3
STREAM_LIMIT = 2
UNARY = "/test.Blocking/Call"
STREAM = "/test.Blocking/Follow"


@dataclass
class Blocking:
    """A service whose calls wait for :attr:`release`; counts how many run at once."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    running: int = 0
    peak: int = 0
    started: int = 0

    async def call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.running += 1
        self.started += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
            return request
        finally:
            self.running -= 1

    async def follow(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield request
        await self.release.wait()


@dataclass
class Server:
    service: Blocking
    overload: OverloadInterceptor
    channel: grpc.aio.Channel

    def unary(self) -> grpc.aio.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(UNARY)

    def stream(self) -> grpc.aio.UnaryStreamMultiCallable:
        return self.channel.unary_stream(STREAM)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    service = Blocking()
    overload = OverloadInterceptor(
        max_in_flight=LIMIT, max_streams=STREAM_LIMIT, retry_after_s=0.25
    )
    grpc_server = GrpcServer(host="127.0.0.1", port=0, interceptors=[overload])
    grpc_server.server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Blocking",
                {
                    "Call": grpc.unary_unary_rpc_method_handler(service.call),
                    "Follow": grpc.unary_stream_rpc_method_handler(service.follow),
                },
            )
        ]
    )
    port = await grpc_server.start()
    await grpc_server.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Server(service, overload, channel)
    finally:
        service.release.set()
        await channel.close()
        await grpc_server.stop(0)


async def _fill(server: Server) -> list[asyncio.Future[bytes]]:
    """LIMIT calls, each blocked inside the handler."""
    calls = [asyncio.ensure_future(server.unary()(b"held", timeout=10)) for _ in range(LIMIT)]
    deadline = time.monotonic() + 5
    while server.service.running < LIMIT:
        assert time.monotonic() < deadline, "the held calls never reached the handler"
        await asyncio.sleep(0.01)
    return calls


async def test_the_call_past_the_limit_is_resource_exhausted_at_once_with_retry_info(
    server: Server,
) -> None:
    held = await _fill(server)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.unary()(b"one too many", timeout=10)
    elapsed = time.monotonic() - started
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert elapsed < 1.0, f"refused after {elapsed:.2f}s: it waited instead of answering"
    details = details_of(caught.value.trailing_metadata())
    assert details.reason == "RESOURCE_EXHAUSTED"
    assert details.retry_after_s == pytest.approx(0.25)
    assert details.metadata["limit"] == str(LIMIT)
    assert f"limit of {LIMIT} calls" in (caught.value.details() or "")
    # Once the held calls finish, calls are admitted again.
    server.service.release.set()
    assert await asyncio.gather(*held) == [b"held"] * LIMIT
    assert await server.unary()(b"again", timeout=5) == b"again"
    assert server.overload.calls.current == 0


async def test_a_sustained_overload_queues_nothing(server: Server) -> None:
    held = await _fill(server)
    # Far more callers than slots, at once: every one past the limit is refused, none of them
    # reaches the handler or waits for a slot, and the counters come back to the limit.
    burst = 200
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(server.unary()(b"x", timeout=10) for _ in range(burst)), return_exceptions=True
    )
    elapsed = time.monotonic() - started
    codes = {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert sum(isinstance(o, grpc.aio.AioRpcError) for o in outcomes) == burst
    assert server.service.started == LIMIT and server.service.peak == LIMIT
    assert server.overload.calls.current == LIMIT and server.overload.calls.peak == LIMIT
    assert server.overload.calls.refused == burst
    assert elapsed < 10.0
    print(f"\n{burst} refused in {elapsed:.2f}s while {LIMIT} calls held", flush=True)
    server.service.release.set()
    await asyncio.gather(*held)
    assert server.overload.calls.current == 0


async def test_memory_stays_flat_under_a_sustained_overload(
    server: Server, spans: InMemorySpanExporter
) -> None:
    held = await _fill(server)

    def _kept() -> int:
        # The test session keeps every span in memory (tests/conftest.py): not the server's.
        spans.clear()
        gc.collect()  # refused calls' errors and tracebacks form cycles: count what stays
        return tracemalloc.get_traced_memory()[0]

    async def burst() -> None:
        await asyncio.gather(
            *(server.unary()(b"x" * 1024, timeout=10) for _ in range(100)), return_exceptions=True
        )

    await burst()  # warm-up: channels, status objects, interned strings
    tracemalloc.start()
    try:
        await burst()
        after_one = _kept()
        for _ in range(4):
            await burst()
        after_five = _kept()
    finally:
        tracemalloc.stop()
    grown = after_five - after_one
    print(f"\n400 more refused calls grew traced memory by {grown / 1024:.0f} KiB", flush=True)
    # Queued calls would hold 400 requests of 1 KiB and their contexts: several MiB.
    assert grown < 512 * 1024
    assert server.overload.calls.refused == 600
    server.service.release.set()
    await asyncio.gather(*held)


async def test_streams_are_counted_apart_from_unary_calls(server: Server) -> None:
    held = await _fill(server)
    # The unary slots are full, yet streams open (up to their own limit).
    streams = [server.stream()(b"s", timeout=10) for _ in range(STREAM_LIMIT)]
    for stream in streams:
        assert await stream.read() == b"s"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in server.stream()(b"third", timeout=10):
            pass
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 2 streams" in (caught.value.details() or "")
    server.service.release.set()
    await asyncio.gather(*held)
    for stream in streams:
        stream.cancel()


async def test_health_answers_while_the_server_is_full(server: Server) -> None:
    held = await _fill(server)
    health = health_pb2_grpc.HealthStub(server.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    server.service.release.set()
    await asyncio.gather(*held)


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="1 or more"):
        InFlight("calls", limit=0, retry_after_s=1.0)
