"""``GetJob`` through the gateway versus straight to the scheduler.

Starts a scheduler and a gateway as their own processes (``LocalPlatform``, with an embedded
nats-server), so they share neither this client's process nor its GIL; tracing runs in them as in
production but exports nothing (``OTEL_TRACES_EXPORTER=none``). Submits one job, waits for it to
end, then measures ``GetJob`` with grpc.aio clients (one channel per target, no client-side
instrumentation) at concurrency 1 and 32, direct and through the gateway, for a fixed time each,
after a warm-up. Direct and gateway runs alternate in rounds so that drift in the machine's load
hits both alike. CPU time of each process per request is read from /proc.

    python -m bench.gateway_overhead           # ~1 minute
    python -m bench.gateway_overhead --quick   # ~20 s smoke run

Prints figures and ratios; never asserts. Targets (README): < 1 ms added at p50 at concurrency 1,
>= 50% of direct throughput at concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.common import Latency, machine_line, ms, print_table, rate, ratio
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.devstack import LocalPlatform, PlatformConfig

TARGET_ADDED_P50_MS = 1.0
TARGET_FRACTION_AT_32 = 0.5
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


@dataclass(frozen=True)
class Options:
    concurrencies: tuple[int, ...]
    duration: float
    rounds: int
    warmup: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), nan elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


@dataclass
class Result:
    target: str
    concurrency: int
    seconds: float = 0.0
    samples: list[float] = field(default_factory=list)
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds during the windows

    @property
    def per_s(self) -> float:
        return len(self.samples) / self.seconds if self.seconds else math.nan

    @property
    def latency(self) -> Latency:
        return Latency.of_seconds(self.samples)

    def cpu_ms_per_request(self, process: str) -> float:
        return (
            self.cpu.get(process, math.nan) * 1000 / len(self.samples) if self.samples else math.nan
        )


async def measure(
    stub: scheduler_pb2_grpc.SchedulerServiceStub,
    request: pb.GetJobRequest,
    result: Result,
    *,
    seconds: float,
    warmup: float,
    pids: dict[str, int],
) -> None:
    """Runs ``result.concurrency`` closed-loop callers; records calls that end inside the window."""
    recording = False
    stopping = False

    async def caller() -> None:
        while not stopping:
            started = time.perf_counter()
            try:
                await stub.GetJob(request, timeout=10)
            except grpc.aio.AioRpcError:
                if recording:
                    result.errors += 1
                continue
            if recording:
                result.samples.append(time.perf_counter() - started)

    callers = [asyncio.create_task(caller()) for _ in range(result.concurrency)]
    try:
        await asyncio.sleep(warmup)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client_before = time.process_time()
        recording = True
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        recording = False
        result.seconds += time.perf_counter() - t0
        for name, pid in pids.items():
            result.cpu[name] = result.cpu.get(name, 0.0) + cpu_seconds(pid) - cpu_before[name]
        result.cpu["client"] = result.cpu.get("client", 0.0) + time.process_time() - client_before
    finally:
        stopping = True
        await asyncio.gather(*callers, return_exceptions=True)


async def wait_for_job_end(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, job_id: str, timeout: float = 30.0
) -> int:
    deadline = time.perf_counter() + timeout
    while True:
        job = await stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)
        if job.state in TERMINAL or time.perf_counter() > deadline:
            return job.state
        await asyncio.sleep(0.1)


async def run(opts: Options) -> dict[tuple[str, int], Result]:
    results: dict[tuple[str, int], Result] = {}
    with tempfile.TemporaryDirectory(prefix="plinth-bench-gateway-") as tmp:
        config = PlatformConfig.ephemeral(
            Path(tmp), services=("scheduler", "gateway"), env={"OTEL_TRACES_EXPORTER": "none"}
        )
        platform = LocalPlatform(config)
        try:
            t0 = time.perf_counter()
            await platform.start(timeout=90)
            print(
                f"scheduler {platform.address('scheduler')}, gateway {platform.address('gateway')} up in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            pids = {name: process.pid for name, process in platform.processes.items()}
            if platform.nats is not None and platform.nats._process is not None:
                pids["nats"] = platform.nats._process.pid
            channels = {
                "direct": grpc.aio.insecure_channel(platform.address("scheduler")),
                "gateway": grpc.aio.insecure_channel(platform.address("gateway")),
            }
            try:
                stubs = {
                    name: scheduler_pb2_grpc.SchedulerServiceStub(ch)
                    for name, ch in channels.items()
                }
                submitted = await stubs["gateway"].SubmitJob(
                    pb.SubmitJobRequest(
                        spec=pb.JobSpec(name="bench-getjob", team="bench", entrypoint=["true"])
                    ),
                    timeout=30,
                )
                state = await wait_for_job_end(stubs["direct"], submitted.job.id)
                print(
                    f"job {submitted.job.id} {pb.JobState.Name(state)}; measuring GetJob",
                    flush=True,
                )
                request = pb.GetJobRequest(job_id=submitted.job.id)
                per_round = opts.duration / opts.rounds
                for concurrency in opts.concurrencies:
                    for name in stubs:
                        results[(name, concurrency)] = Result(name, concurrency)
                    for round_no in range(opts.rounds):
                        order = list(stubs) if round_no % 2 == 0 else list(reversed(stubs))
                        for name in order:
                            await measure(
                                stubs[name],
                                request,
                                results[(name, concurrency)],
                                seconds=per_round,
                                warmup=opts.warmup,
                                pids=pids,
                            )
                    d, g = results[("direct", concurrency)], results[("gateway", concurrency)]
                    print(
                        f"  c={concurrency}: direct {rate(d.per_s)}/s p50 {ms(d.latency.p50)} ms | gateway {rate(g.per_s)}/s p50 {ms(g.latency.p50)} ms",
                        flush=True,
                    )
            finally:
                for channel in channels.values():
                    await channel.close()
        finally:
            await platform.stop()
    return results


def report(results: dict[tuple[str, int], Result], opts: Options) -> None:
    rows = []
    for (name, concurrency), r in results.items():
        lat = r.latency
        rows.append(
            [
                name,
                concurrency,
                rate(r.per_s),
                *lat.cells(),
                r.errors,
                *(ms(r.cpu_ms_per_request(p)) for p in ("client", "gateway", "scheduler")),
            ]
        )
    print_table(
        f"GetJob ({opts.duration:g} s per row in {opts.rounds} alternating rounds, after {opts.warmup:g} s warm-up each; latency in ms)",
        [
            "target",
            "conc",
            "req/s",
            "p50",
            "p90",
            "p99",
            "max",
            "errors",
            "cpu ms/req client",
            "gateway",
            "scheduler",
        ],
        rows,
    )
    ratio_rows = []
    if ("direct", 1) in results and ("gateway", 1) in results:
        d, g = results[("direct", 1)].latency, results[("gateway", 1)].latency
        added = g.p50 - d.p50
        ratio_rows.append(
            [
                "added p50 at concurrency 1",
                f"{added:.3f} ms",
                f"< {TARGET_ADDED_P50_MS:g} ms",
                "met" if added < TARGET_ADDED_P50_MS else "MISSED",
            ]
        )
        ratio_rows.append(["added p99 at concurrency 1", f"{g.p99 - d.p99:.3f} ms", "", ""])
        ratio_rows.append(
            [
                "gateway / direct throughput at concurrency 1",
                f"{ratio(results[('gateway', 1)].per_s, results[('direct', 1)].per_s):.1%}",
                "",
                "",
            ]
        )
    top = max(opts.concurrencies)
    if ("direct", top) in results and ("gateway", top) in results:
        share = ratio(results[("gateway", top)].per_s, results[("direct", top)].per_s)
        target = f">= {TARGET_FRACTION_AT_32:.0%}" if top == 32 else ""
        ratio_rows.append(
            [
                f"gateway / direct throughput at concurrency {top}",
                f"{share:.1%}",
                target,
                ("met" if share >= TARGET_FRACTION_AT_32 else "MISSED") if target else "",
            ]
        )
        d, g = results[("direct", top)].latency, results[("gateway", top)].latency
        ratio_rows.append([f"added p50 at concurrency {top}", f"{g.p50 - d.p50:.3f} ms", "", ""])
    print_table("Ratios and targets", ["measure", "value", "target", ""], ratio_rows)


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measured seconds per target and concurrency (default 8)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternating direct/gateway rounds the duration is split into (default 2)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds before each measured window (default 1)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 32],
        help="concurrent callers (default 1 32)",
    )
    parser.add_argument("--quick", action="store_true", help="~20 s smoke run")
    a = parser.parse_args(argv)
    return Options(
        concurrencies=tuple(a.concurrency),
        duration=a.duration or (2.0 if a.quick else 8.0),
        rounds=a.rounds or (1 if a.quick else 2),
        warmup=a.warmup if a.warmup is not None else (0.3 if a.quick else 1.0),
    )


async def amain(opts: Options) -> None:
    print(f"bench.gateway_overhead | {machine_line()}", flush=True)
    started = time.perf_counter()
    results = await run(opts)
    report(results, opts)
    print(f"total {time.perf_counter() - started:.0f} s | at the end: {machine_line()}")


def main(argv: list[str] | None = None) -> None:
    asyncio.run(amain(parse(argv)))


if __name__ == "__main__":
    main()
