"""Online features through Plinth against Feast's own feature server, same repository, same data.

Both servers run as processes of their own, started here on loopback:

- Plinth: ``python -m services.features`` (its real entry point, tracing on, export off), the
  example driver repository applied with ``ApplyRepository`` and materialized with
  ``Materialize`` into the SQLite online store;
- Feast: ``feast serve`` on that same repository folder (same registry, same online store file),
  one worker as by default. Its default recycles the worker every ~1,000 requests, which stalls
  requests for about a second (DESIGN §7); the peer here runs with ``--max-requests 0`` so that
  Plinth is compared with Feast at its best (``--feast-recycling`` restores the default).

Clients share this process: aiohttp (JSON, as Feast's documentation shows) for ``feast serve``,
grpc.aio for Plinth. Each scenario (1 or 100 entity rows; 1 or 8 concurrent closed-loop clients)
runs on both servers back to back and prints p50/p99 latency, requests/s and Plinth/Feast ratios.
Before timing, the values both servers return are compared.

    python -m bench.online_features            # ~2 minutes
    python -m bench.online_features --quick    # ~40 s smoke run

Prints figures and ratios; never asserts. Target (issue): Plinth's p99 at most half of
``feast serve``'s, for 1 and for 100 rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import Latency, machine_line, ms, print_table, rate, ratio
from examples.feature_repo.generate_data import FIRST_DRIVER_ID, definition_files, generate
from plinth.features.v1 import features_pb2 as pb
from plinth.features.v1 import features_pb2_grpc
from plinth_common.auth import InternalTokens, Principal, identity_interceptors, load_internal_key
from plinth_common.nats_server import NatsServer
from plinth_common.net import free_tcp_port, wait_for_port

FEATURES = [
    "driver_hourly_stats:conv_rate",
    "driver_hourly_stats:acc_rate",
    "driver_hourly_stats:avg_daily_trips",
]
PROJECT = "bench_online"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Result:
    """One scenario on one server."""

    latency: Latency
    per_second: float
    errors: int


Call = Callable[[], Awaitable[None]]


async def measure(call: Call, *, clients: int, seconds: float, warmup_s: float) -> Result:
    """Closed loop: ``clients`` tasks call back to back for ``seconds`` after a warm-up."""
    samples: list[float] = []
    errors = 0
    recording = False
    stop_at = math.inf

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            try:
                await call()
            except Exception:  # noqa: BLE001 - counted, never fatal for a benchmark
                errors += 1
                continue
            if recording:
                samples.append(time.perf_counter() - began)

    stop_at = time.perf_counter() + warmup_s + seconds
    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(warmup_s)
    recording, started = True, time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    return Result(Latency.of_seconds(samples), len(samples) / elapsed, errors)


def driver_ids(rows: int) -> list[int]:
    """Distinct materialized drivers (the example data has 200)."""
    return [FIRST_DRIVER_ID + i for i in range(rows)]


class FeastPeer:
    """``feast serve`` on the repository, called over HTTP/JSON."""

    def __init__(self, repo: Path, *, recycling: bool, log_path: Path) -> None:
        self.port = free_tcp_port()
        self._repo = repo
        self._recycling = recycling
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        feast = Path(sys.executable).with_name("feast")
        command = [
            str(feast),
            "-c",
            str(self._repo),
            "serve",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--no-access-log",
        ]
        if not self._recycling:
            command += ["--max-requests", "0"]
        log = self._log_path.open("wb")
        self._process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=self._repo
        )
        await wait_for_port("127.0.0.1", self.port, timeout=120)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                async with self.session.get(f"http://127.0.0.1:{self.port}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError("feast serve did not become healthy")

    def health_call(self) -> Call:
        """A bare GET /health: the HTTP stack's own cost, no feature read."""
        url, session = f"http://127.0.0.1:{self.port}/health", self.session
        assert session is not None

        async def call() -> None:
            async with session.get(url) as response:
                await response.read()

        return call

    def call(self, rows: int) -> Call:
        """A request for ``rows`` entity rows."""
        url = f"http://127.0.0.1:{self.port}/get-online-features"
        body = json.dumps(
            {"features": FEATURES, "entities": {"driver_id": driver_ids(rows)}}
        ).encode()
        headers = {"Content-Type": "application/json"}
        assert self.session is not None
        session = self.session

        async def call() -> None:
            async with session.post(url, data=body, headers=headers) as response:
                payload = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"feast serve answered {response.status}: {payload[:200]!r}")
                json.loads(payload)

        return call

    async def values(self, rows: int) -> dict[str, list[object]]:
        """Feature -> values, as feast serve returns them."""
        assert self.session is not None
        body = {"features": FEATURES, "entities": {"driver_id": driver_ids(rows)}}
        async with self.session.post(
            f"http://127.0.0.1:{self.port}/get-online-features", json=body
        ) as response:
            payload = await response.json()
        names = payload["metadata"]["feature_names"]
        return {
            name: result["values"]
            for name, result in zip(names, payload["results"], strict=True)
            if name != "driver_id"
        }

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self._process is not None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 15)
            except subprocess.TimeoutExpired:
                self._process.kill()


class PlinthPeer:
    """The features service as a process, called over gRPC."""

    def __init__(self, data_dir: Path, nats_url: str, *, log_path: Path) -> None:
        self.port = free_tcp_port()
        self.data_dir = data_dir
        self._nats_url = nats_url
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: features_pb2_grpc.FeaturesServiceStub | None = None

    @property
    def repo(self) -> Path:
        """The Feast repository folder the service uses."""
        return self.data_dir / "feast"

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLINTH_")}
        env.update(
            PLINTH_DATA_DIR=str(self.data_dir),
            PLINTH_NATS_URL=self._nats_url,
            PLINTH_FEATURES_PORT=str(self.port),
            PLINTH_FEAST_PROJECT=PROJECT,
            PLINTH_LOG_LEVEL="WARNING",
            OTEL_TRACES_EXPORTER="none",
        )
        log = self._log_path.open("wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "services.features"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        await wait_for_port("127.0.0.1", self.port, timeout=60)
        # Called as the gateway forwards calls: with an identity signed by the platform's key
        # (the service created it under its data dir), so the figures include its check.
        tokens = InternalTokens(load_internal_key("", self.data_dir / "run" / "internal.key"))
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.port}",
            interceptors=identity_interceptors(tokens, Principal("bench", admin=True)),
        )
        self.stub = features_pb2_grpc.FeaturesServiceStub(self.channel)
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("the features service did not become SERVING")

    async def prepare(self) -> None:
        """Generates the data, applies the example repository and materializes it."""
        assert self.stub is not None
        generate(self.repo / "data")
        await self.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))
        request = pb.MaterializeRequest(feature_views=["driver_hourly_stats"])
        request.start_time.FromDatetime(datetime(2023, 12, 1, tzinfo=UTC))
        request.end_time.FromDatetime(datetime(2024, 2, 1, tzinfo=UTC))
        await self.stub.Materialize(request)

    def health_call(self) -> Call:
        """A bare gRPC health check: the gRPC stack's own cost (tracing included), no feature read."""
        assert self.channel is not None
        check, request = (
            health_pb2_grpc.HealthStub(self.channel).Check,
            health_pb2.HealthCheckRequest(),
        )

        async def call() -> None:
            await check(request)

        return call

    def request(self, rows: int) -> pb.GetOnlineFeaturesRequest:
        """A request for ``rows`` entity rows."""
        return pb.GetOnlineFeaturesRequest(
            features=FEATURES,
            entity_rows=[
                struct_pb2.Struct(fields={"driver_id": struct_pb2.Value(number_value=d)})
                for d in driver_ids(rows)
            ],
        )

    def call(self, rows: int) -> Call:
        """A call for ``rows`` entity rows (the request is built once)."""
        assert self.stub is not None
        request, method = self.request(rows), self.stub.GetOnlineFeatures

        async def call() -> None:
            await method(request)

        return call

    async def values(self, rows: int) -> dict[str, list[object]]:
        """Feature -> values, as Plinth returns them."""
        assert self.stub is not None
        response = await self.stub.GetOnlineFeatures(self.request(rows))
        out: dict[str, list[object]] = {}
        for column in response.columns:
            name = column.name.split(":", 1)[1]
            out[name] = [
                v.number_value if v.WhichOneof("kind") == "number_value" else None
                for v in column.values
            ]
        return out

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self._process is not None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 15)
            except subprocess.TimeoutExpired:
                self._process.kill()


def same_values(feast: dict[str, list[object]], plinth: dict[str, list[object]]) -> bool:
    """True when both servers returned the same numbers for every feature and row."""
    if set(feast) != set(plinth):
        return False
    for name, values in feast.items():
        for a, b in zip(values, plinth[name], strict=True):
            if a is None or b is None:
                if a is not b:
                    return False
            elif not math.isclose(float(a), float(b), rel_tol=1e-6):  # type: ignore[arg-type]
                return False
    return True


async def run(args: argparse.Namespace) -> None:
    seconds, warmup = (2.0, 0.5) if args.quick else (args.seconds, 1.0)
    work = Path(tempfile.mkdtemp(prefix="plinth-bench-features-"))
    nats = NatsServer(work / "nats")
    plinth: PlinthPeer | None = None
    feast: FeastPeer | None = None
    try:
        await nats.start()
        plinth = PlinthPeer(work / "data", nats.url, log_path=work / "plinth.log")
        began = time.perf_counter()
        await plinth.start()
        await plinth.prepare()
        print(
            f"Plinth features service ready (applied, materialized) in {time.perf_counter() - began:.1f} s",
            flush=True,
        )
        feast = FeastPeer(
            plinth.repo, recycling=args.feast_recycling, log_path=work / "feast-serve.log"
        )
        began = time.perf_counter()
        await feast.start()
        print(
            f"feast serve ready in {time.perf_counter() - began:.1f} s "
            f"(worker recycling {'default' if args.feast_recycling else 'off: --max-requests 0'})",
            flush=True,
        )

        for rows in (1, 100):
            agree = same_values(await feast.values(rows), await plinth.values(rows))
            print(
                f"values for {rows} row(s): {'identical' if agree else 'DIFFERENT'} on both servers",
                flush=True,
            )

        table: list[list[object]] = []
        for rows in (1, 100):
            for clients in (1, 8):
                results: dict[str, Result] = {}
                for name, peer in (("feast serve", feast), ("plinth", plinth)):
                    results[name] = await measure(
                        peer.call(rows), clients=clients, seconds=seconds, warmup_s=warmup
                    )
                f, p = results["feast serve"], results["plinth"]
                for name, r in results.items():
                    table.append(
                        [
                            f"{rows:>3} row(s), {clients} client(s), {name}",
                            r.latency.n,
                            ms(r.latency.p50),
                            ms(r.latency.p99),
                            ms(r.latency.max),
                            rate(r.per_second),
                            r.errors,
                        ]
                    )
                table.append(
                    [
                        f"{rows:>3} row(s), {clients} client(s), plinth/feast",
                        "",
                        f"{ratio(p.latency.p50, f.latency.p50):.2f}",
                        f"{ratio(p.latency.p99, f.latency.p99):.2f}",
                        f"{ratio(p.latency.max, f.latency.max):.2f}",
                        f"{ratio(p.per_second, f.per_second):.2f}",
                        "",
                    ]
                )
        floors = []
        for name, peer in (
            ("feast serve GET /health", feast),
            ("plinth grpc Health.Check", plinth),
        ):
            r = await measure(peer.health_call(), clients=1, seconds=seconds / 2, warmup_s=warmup)
            floors.append(
                [
                    name,
                    r.latency.n,
                    ms(r.latency.p50),
                    ms(r.latency.p99),
                    ms(r.latency.max),
                    rate(r.per_second),
                    r.errors,
                ]
            )
        print(f"\n{machine_line()}")
        print_table(
            "Transport floor: a bare call to each server, 1 client (ms)",
            ["call", "n", "p50", "p99", "max", "req/s", "errors"],
            floors,
        )
        print_table(
            f"GetOnlineFeatures, {len(FEATURES)} features, {seconds:.0f} s per run (ms; ratio rows: Plinth / Feast, lower latency and higher req/s is better)",
            ["scenario", "n", "p50", "p99", "max", "req/s", "errors"],
            table,
        )
        print("target: plinth/feast p99 <= 0.50 for 1 and 100 rows")
    finally:
        if feast is not None:
            await feast.stop()
        if plinth is not None:
            await plinth.stop()
        await nats.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 s per run (smoke)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument(
        "--feast-recycling",
        action="store_true",
        help="run feast serve with its default worker recycling",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
