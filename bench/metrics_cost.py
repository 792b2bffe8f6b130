"""What the metrics cost: a ``GetJob``-like unary call's throughput with metrics on versus off,
in the same run.

A server process (this module with ``--serve``) runs two :class:`~plinth_common.grpc_server.
GrpcServer` on one event loop, each with the scheduler's generated ``SchedulerService`` whose
``GetJob`` answers a filled-in ``Job`` from memory (no store: the call's own cost is all there is,
so the metrics' share is as large as it can be). Both run production tracing (the OpenTelemetry
server interceptor, spans batched and discarded); one also has the process's
:class:`~plinth_common.metrics.Metrics` (the gRPC interceptor, a latency exemplar per call) and
its HTTP endpoint, scraped once a second by this client (Prometheus would scrape every 15 s).
The client measures each server for a fixed time at concurrency 1 and 16, the two taking turns in
ABBA rounds so that the machine's drift hits both alike, and reads the server process's CPU time
per call from /proc. It also times the recording itself in-process (one counter increment and one
histogram observation with its exemplar, as the interceptor does per call).

    python -m bench.metrics_cost           # ~1 minute
    python -m bench.metrics_cost --quick   # ~15 s smoke run

Prints figures and ratios; never asserts. Target (issue 11): throughput with metrics at most 5%
lower than without. A full ``GetJob`` through the real scheduler and ``ModelInfer`` version is
the second part of issue 11.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from bench.common import (
    install_production_tracing,
    machine_line,
    ms,
    percentile,
    print_table,
    rate,
)
from bench.gateway_overhead import cpu_seconds
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.grpc_server import GrpcServer, MethodMetrics, _wrap_unary
from plinth_common.metrics import Metrics
from plinth_common.net import free_tcp_port, wait_for_port

TARGET_FRACTION = 0.95
SERVICE = "plinth.scheduler.v1.SchedulerService"


def _job() -> pb.Job:
    now = Timestamp(seconds=1_764_000_000)
    return pb.Job(
        id="j-0123456789abcdef",
        spec=pb.JobSpec(name="train-resnet", team="vision", entrypoint=["python", "train.py"]),
        state=pb.JOB_STATE_RUNNING,
        created_at=now,
        started_at=now,
        admitted_at=now,
        queue="vision",
        flavor="default",
        priority="normal",
        attempt=1,
        queue_wait_seconds=12.5,
        outputs={"checkpoint": "s3://bucket/vision/j-0123456789abcdef/ckpt"},
    )


class Jobs(scheduler_pb2_grpc.SchedulerServiceServicer):
    """``GetJob`` from memory."""

    def __init__(self) -> None:
        self._job = _job()

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return self._job


#: The servers of the server process, in port order: without metrics, with them, and a second
#: one without, whose figures against the first show how far this machine's noise goes.
VARIANTS = ("off", "on", "control")


async def serve(ports: list[int], metrics_port: int) -> None:
    """The server process: the same servicer with and without metrics, until stdin closes."""
    install_production_tracing("bench-metrics-cost", sqlalchemy=False)
    from plinth_common.telemetry import instrument_grpc_aio

    instrument_grpc_aio(clients=False)
    metrics = Metrics("scheduler")
    servers = [
        GrpcServer(host="127.0.0.1", port=port, metrics=metrics if variant == "on" else None)
        for variant, port in zip(VARIANTS, ports, strict=True)
    ]
    for server in servers:
        server.add(scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, Jobs(), SERVICE)
        await server.start()
        await server.set_serving(True)
    await metrics.serve("127.0.0.1", metrics_port)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # the client closes stdin when done
    for server in servers:
        await server.stop(0)
    await metrics.close()


@dataclass
class Round:
    calls: int
    seconds: float
    cpu_s: float
    latencies: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds


async def measure(port: int, concurrency: int, seconds: float, pid: int) -> Round:
    """Calls ``GetJob`` from ``concurrency`` workers for ``seconds``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        request = pb.GetJobRequest(job_id="j-0123456789abcdef")
        await stub.GetJob(request, timeout=10)  # connected before the clock starts
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker() -> int:
            n = 0
            while time.perf_counter() < stop_at:
                began = time.perf_counter()
                await stub.GetJob(request, timeout=10)
                latencies.append(time.perf_counter() - began)
                n += 1
            return n

        cpu_before, began = cpu_seconds(pid), time.perf_counter()
        counts = await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - began, cpu_seconds(pid) - cpu_before
    return Round(sum(counts), elapsed, cpu, latencies)


async def scrape_forever(port: int) -> None:
    """Scrapes the metrics endpoint once a second (in a thread, as a remote scraper would)."""
    url = f"http://127.0.0.1:{port}/metrics"
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}

    def get() -> None:
        with urllib.request.urlopen(urllib.request.Request(url, headers=accept), timeout=5) as r:
            r.read()

    while True:
        await asyncio.to_thread(get)
        await asyncio.sleep(1.0)


def _throughput(rounds: list[Round]) -> float:
    return statistics.median(r.throughput for r in rounds)


def _cpu_us(rounds: list[Round]) -> float:
    return sum(r.cpu_s for r in rounds) / sum(r.calls for r in rounds) * 1e6


def _latency(rounds: list[Round], q: float) -> str:
    return ms(percentile(sorted(x for r in rounds for x in r.latencies), q) * 1000)


class _Context:
    """The part of a servicer context the wrapper reads after a call."""

    def code(self) -> grpc.StatusCode | None:
        return None


async def wrapper_cost_us(n: int = 50_000, repeats: int = 5) -> float:
    """CPU microseconds the metrics add to one call in the error-mapping wrapper (the median of
    ``repeats`` runs of ``n`` calls each way, inside a sampled span as in production)."""
    metrics = Metrics("bench")
    path = f"/{SERVICE}/GetJob"

    async def handler(request: bytes, context: _Context) -> bytes:
        return request

    def decode(raw: bytes) -> bytes:
        return raw

    plain = _wrap_unary(handler, path, decode, None, None)
    measured = _wrap_unary(handler, path, decode, None, MethodMetrics(metrics, path))

    async def cpu_per_call(wrapped: Callable[..., Awaitable[Any]]) -> float:
        context = _Context()
        began = time.process_time()
        for _ in range(n):
            await wrapped(b"x", context)
        return (time.process_time() - began) / n * 1e6

    async def differences() -> list[float]:
        found = []
        with trace.get_tracer("bench").start_as_current_span("call"):
            for _ in range(repeats):
                found.append(await cpu_per_call(measured) - await cpu_per_call(plain))
        return found

    return statistics.median(await differences())


async def run(rounds: int, seconds: float, concurrencies: tuple[int, ...]) -> None:
    ports = [free_tcp_port() for _ in VARIANTS]
    metrics_port = free_tcp_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.metrics_cost", "--serve"]
        + [str(port) for port in (*ports, metrics_port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    port_of = dict(zip(VARIANTS, ports, strict=True))
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the server process did not start")
        for port in (*ports, metrics_port):
            await wait_for_port("127.0.0.1", port, timeout=10)
        scraper = asyncio.create_task(scrape_forever(metrics_port))
        print(machine_line())
        rows = []
        cpu_off: list[float] = []
        fractions: list[tuple[float, float]] = []
        for concurrency in concurrencies:
            for variant in VARIANTS:  # warm-up
                await measure(port_of[variant], concurrency, seconds / 2, server.pid)
            results: dict[str, list[Round]] = {variant: [] for variant in VARIANTS}
            for i in range(rounds):
                # Each round rotates the order, so no variant always follows another.
                order = VARIANTS[i % 3 :] + VARIANTS[: i % 3]
                for variant in order:
                    results[variant].append(
                        await measure(port_of[variant], concurrency, seconds, server.pid)
                    )

            on_off = _throughput(results["on"]) / _throughput(results["off"])
            control_off = _throughput(results["control"]) / _throughput(results["off"])
            fractions.append((on_off, control_off))
            cpu_off.append(_cpu_us(results["off"]))
            rows.append(
                [
                    f"concurrency {concurrency}",
                    " / ".join(rate(_throughput(results[v])) for v in VARIANTS),
                    f"{on_off:.3f}",
                    f"{control_off:.3f}",
                    " / ".join(f"{_cpu_us(results[v]):.0f}" for v in VARIANTS),
                    " / ".join(_latency(results[v], 50) for v in VARIANTS),
                    " / ".join(_latency(results[v], 99) for v in VARIANTS),
                ]
            )
        scraper.cancel()
        print_table(
            f"GetJob-like unary calls without metrics, with them, and without again (the noise"
            f" control); {rounds} rotating rounds of {seconds:g} s, median throughput",
            [
                "",
                "calls/s off / on / control",
                "on/off",
                "control/off",
                "server CPU us/call",
                "p50 ms",
                "p99 ms",
            ],
            rows,
        )
        added = await wrapper_cost_us()
        estimate = min(cpu / (cpu + added) for cpu in cpu_off)
        print(
            f"the metrics add {added:.1f} us of CPU per call (in-process, counter + histogram"
            f" with its exemplar); against {min(cpu_off):.0f} us of server CPU per call that is"
            f" a throughput of {estimate:.3f} of the off server's for a CPU-bound service"
        )
        worst = min(on for on, _ in fractions)
        noise = max(abs(control - 1) for _, control in fractions)
        verdict = "met" if worst >= TARGET_FRACTION else "missed"
        print(
            f"target: on/off >= {TARGET_FRACTION:.2f}: {verdict} as measured (worst {worst:.3f});"
            f" the same run's noise, control/off, reached {noise:.1%}; CPU-based estimate"
            f" {estimate:.3f}: {'met' if estimate >= TARGET_FRACTION else 'missed'}"
        )
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    """Runs the benchmark (or, with ``--serve``, its server process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=0, help="ABBA rounds per concurrency")
    parser.add_argument("--serve", nargs=len(VARIANTS) + 1, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve[:-1], args.serve[-1]))
        return
    rounds = args.rounds or (4 if args.quick else 10)
    seconds = 1.0 if args.quick else 2.5
    asyncio.run(run(rounds, seconds, (1, 16)))


if __name__ == "__main__":
    main()
