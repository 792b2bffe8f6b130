"""``GetJob`` through the gateway — with an API key, with an OIDC JWT, and through a gateway that
authenticates nobody (:mod:`bench.open_gateway`) — versus straight to the scheduler.

Starts a scheduler and a gateway as their own processes (``LocalPlatform``, with an embedded
nats-server), so they share neither this client's process nor its GIL; tracing runs in them as in
production but exports nothing (``OTEL_TRACES_EXPORTER=none``). Submits one job, waits for it to
end, then measures ``GetJob`` with grpc.aio clients (one channel per target, no client-side
instrumentation) at concurrency 1 and 32, direct and through the gateway, for a fixed time each,
after a warm-up. The targets take turns in rotating rounds so that drift in the machine's load
hits all alike. CPU time of each process per request is read from /proc. The direct calls carry
the identity the gateway would forward (services refuse calls without one); the JWT comes from
an OIDC issuer the benchmark runs on loopback.

    python -m bench.gateway_overhead           # ~1 minute
    python -m bench.gateway_overhead --quick   # ~20 s smoke run

Prints figures and ratios; never asserts. Targets (README): forwarding (the open gateway) adds
< 1 ms at p50 at concurrency 1 and keeps >= 50% of direct throughput at concurrency 32;
authentication and authorization (API key, JWT) add <= 0.2 ms at p50 at concurrency 1 and keep
>= 90% of the open gateway's throughput at concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import Latency, machine_line, ms, print_table, rate, ratio
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.auth import bearer_interceptors
from plinth_common.devstack import LocalPlatform, PlatformConfig
from plinth_common.net import free_tcp_port, wait_for_port

TARGET_ADDED_P50_MS = 1.0
TARGET_FRACTION_AT_32 = 0.5
TARGET_AUTH_ADDED_P50_MS = 0.2
TARGET_AUTH_FRACTION = 0.9
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


TARGETS = ("direct", "open gateway", "gateway api key", "gateway jwt")


class Issuer:
    """An OIDC issuer of the benchmark's own on loopback: a JWKS endpoint and one RS256 token."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwks = {"keys": [{**jwk, "kid": "bench", "alg": "RS256", "use": "sig"}]}

        async def serve_jwks(_: web.Request) -> web.Response:
            return web.json_response(jwks)

        app = web.Application()
        app.router.add_get("/jwks", serve_jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def token(self) -> str:
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": "plinth",
            "sub": "bench-oidc",
            "preferred_username": "bench-oidc",
            "groups": ["bench:viewer"],
            "iat": now,
            "exp": now + 3600,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "bench"})

    def gateway_env(self) -> dict[str, str]:
        return {
            "PLINTH_OIDC_ISSUER": self.url,
            "PLINTH_OIDC_JWKS_URL": f"{self.url}/jwks",
            "PLINTH_OIDC_AUDIENCE": "plinth",
        }

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def start_open_gateway(
    platform: LocalPlatform, root: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts :mod:`bench.open_gateway` beside the platform's own gateway (its own ports and
    store); returns the process and its address once it serves."""
    port, http_port = free_tcp_port(), free_tcp_port()
    env = platform.service_env("gateway")
    env.pop("PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE", None)
    env.update(
        PLINTH_GATEWAY_PORT=str(port),
        PLINTH_GATEWAY_HTTP_PORT=str(http_port),
        PLINTH_GATEWAY_DATABASE_URL=f"sqlite+aiosqlite:///{root / 'open-gateway.db'}",
        OTEL_SERVICE_NAME="plinth-open-gateway",
    )
    log = (root / "open-gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.open_gateway"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[1],
    )
    address = f"127.0.0.1:{port}"
    await wait_for_port("127.0.0.1", port, timeout=60)
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            reply = await health.Check(health_pb2.HealthCheckRequest())
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return process, address
            await asyncio.sleep(0.2)
    process.kill()
    raise TimeoutError("the open gateway did not become SERVING")


async def run(opts: Options) -> dict[tuple[str, int], Result]:
    results: dict[tuple[str, int], Result] = {}
    issuer = Issuer()
    await issuer.start()
    with tempfile.TemporaryDirectory(prefix="plinth-bench-gateway-") as tmp:
        env = {
            "OTEL_TRACES_EXPORTER": "none",
            # No registry runs here: jobs get no MLflow user. Limits far above what two cores
            # serve, so the bucket is taken on every call but never refuses one.
            "PLINTH_SCHEDULER_MLFLOW_AUTH": "none",
            "PLINTH_GATEWAY_RATE_ADMIN": "1000000",
            "PLINTH_GATEWAY_RATE_VIEWER": "1000000",
            **issuer.gateway_env(),
        }
        config = PlatformConfig.ephemeral(Path(tmp), services=("scheduler", "gateway"), env=env)
        platform = LocalPlatform(config)
        open_process: subprocess.Popen[bytes] | None = None
        try:
            t0 = time.perf_counter()
            await platform.start(timeout=90)
            open_process, open_address = await start_open_gateway(platform, Path(tmp))
            print(
                f"scheduler {platform.address('scheduler')}, gateway {platform.address('gateway')}, open gateway {open_address} up in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            started = {name: process.pid for name, process in platform.processes.items()}
            started["open gateway"] = open_process.pid
            if platform.nats is not None and platform.nats._process is not None:
                started["nats"] = platform.nats._process.pid
            # All running by now, so every one has a pid.
            pids = {name: pid for name, pid in started.items() if pid is not None}
            gateway = platform.address("gateway")
            channels = {
                "direct": platform.service_channel("scheduler"),
                "open gateway": grpc.aio.insecure_channel(open_address),
                "gateway api key": grpc.aio.insecure_channel(
                    gateway, interceptors=bearer_interceptors(platform.admin_key)
                ),
                "gateway jwt": grpc.aio.insecure_channel(
                    gateway, interceptors=bearer_interceptors(issuer.token())
                ),
            }
            try:
                stubs = {
                    name: scheduler_pb2_grpc.SchedulerServiceStub(ch)
                    for name, ch in channels.items()
                }
                submitted = await stubs["gateway api key"].SubmitJob(
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
                        # Rotate the order each round, so drift in load hits every target.
                        shift = round_no % len(TARGETS)
                        for name in TARGETS[shift:] + TARGETS[:shift]:
                            await measure(
                                stubs[name],
                                request,
                                results[(name, concurrency)],
                                seconds=per_round,
                                warmup=opts.warmup,
                                pids=pids,
                            )
                    line = " | ".join(
                        f"{name} {rate(results[(name, concurrency)].per_s)}/s p50 {ms(results[(name, concurrency)].latency.p50)} ms"
                        for name in TARGETS
                    )
                    print(f"  c={concurrency}: {line}", flush=True)
            finally:
                for channel in channels.values():
                    await channel.close()
        finally:
            if open_process is not None:
                open_process.terminate()
                try:
                    open_process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    open_process.kill()
                    open_process.wait()
            await platform.stop()
            await issuer.stop()
    return results


def report(results: dict[tuple[str, int], Result], opts: Options) -> None:
    processes = ("client", "gateway", "open gateway", "scheduler")
    rows = []
    for (name, concurrency), r in results.items():
        rows.append(
            [
                name,
                concurrency,
                rate(r.per_s),
                *r.latency.cells(),
                r.errors,
                *(ms(r.cpu_ms_per_request(p)) for p in processes),
            ]
        )
    print_table(
        f"GetJob ({opts.duration:g} s per row in {opts.rounds} rotating rounds, after {opts.warmup:g} s warm-up each; latency in ms)",
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
            *processes[1:],
        ],
        rows,
    )
    ratio_rows: list[list[str]] = []
    low, top = min(opts.concurrencies), max(opts.concurrencies)
    if ("direct", low) in results and ("open gateway", low) in results:
        added = results[("open gateway", low)].latency.p50 - results[("direct", low)].latency.p50
        ratio_rows.append(
            [
                f"forwarding: open gateway p50 - direct, concurrency {low}",
                f"{added:.3f} ms",
                f"< {TARGET_ADDED_P50_MS:g} ms",
                "met" if added < TARGET_ADDED_P50_MS else "MISSED",
            ]
        )
    if ("direct", top) in results and ("open gateway", top) in results:
        share = ratio(results[("open gateway", top)].per_s, results[("direct", top)].per_s)
        ratio_rows.append(
            [
                f"forwarding: open gateway / direct throughput, concurrency {top}",
                f"{share:.1%}",
                f">= {TARGET_FRACTION_AT_32:.0%}",
                "met" if share >= TARGET_FRACTION_AT_32 else "MISSED",
            ]
        )
    for name in ("gateway api key", "gateway jwt"):
        if (name, low) in results and ("open gateway", low) in results:
            added = results[(name, low)].latency.p50 - results[("open gateway", low)].latency.p50
            ratio_rows.append(
                [
                    f"auth: {name} p50 - open gateway, concurrency {low}",
                    f"{added:.3f} ms",
                    f"<= {TARGET_AUTH_ADDED_P50_MS:g} ms",
                    "met" if added <= TARGET_AUTH_ADDED_P50_MS else "MISSED",
                ]
            )
        if (name, top) in results and ("open gateway", top) in results:
            share = ratio(results[(name, top)].per_s, results[("open gateway", top)].per_s)
            ratio_rows.append(
                [
                    f"auth: {name} / open gateway throughput, concurrency {top}",
                    f"{share:.1%}",
                    f">= {TARGET_AUTH_FRACTION:.0%}",
                    "met" if share >= TARGET_AUTH_FRACTION else "MISSED",
                ]
            )
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
