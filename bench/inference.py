"""Inference throughput and latency: straight to Triton, through the data plane (HAProxy), and
through Plinth's serving service (the old Python path).

``python -m bench.inference [--quick] [--rounds N] [--pin]`` prints figures and asserts nothing.

It starts a nats-server and the serving service as its own process (``python -m
services.serving``, which launches Triton), logs a small scikit-learn model (Ridge on the
diabetes data, 10 FP64 columns) to an in-process MLflow store (SQLite, no server), creates three
deployments of it (no dynamic batching, 500 us and 4 ms batching windows), and promotes the
version the way the registry does (a ``plinth.model.promoted`` CloudEvent). Then, for each
deployment at concurrency 1 and 32, it sends single-row ModelInfer calls for a fixed time to
serving's KServe v2 endpoint and to Triton's own (the deployment's internal model), with the
same client, and prints requests/s, p50 and p99 and the ratios.

Serving runs as in production: a server span per inference (made, nothing exported), no client
span for the call to Triton. To see the data plane without per-inference spans, run with
``OTEL_PYTHON_GRPC_EXCLUDED_SERVICES=inference.GRPCInferenceService``.

The client sends pre-serialized requests over ``grpc.aio`` (bytes, no tensor encoding per
call), so its own cost is small and equal for both targets; it runs in this process, on the
same cores as serving and Triton. Direct and Plinth runs alternate in rounds so that drift in
the machine's load hits both alike, and the CPU time that serving, Triton (with its Python
stubs) and the client spend per request is read from /proc: on a shared machine that figure is
steadier than requests/s.

Serving accepts only calls that carry a forwarded identity (what the gateway adds): the
benchmark mints one for a developer of the deployments' team with a key it shares with serving,
and sends it as call metadata, as the gateway does.

The data plane (services/serving/dataplane: HAProxy 2.6 with plinth.lua) runs as its own
process, started by the benchmark in front of the same Triton, with a route per deployment and
one API key granted on all of them; every call carries that key (``authorization: Bearer
plk_...``), so each request pays the key check, the route choice, and the body rewrites
(Triton's model name into the request, the deployment's back into the response). A second
data plane ("dataplane direct") routes each deployment to a *direct* backend: a copy of its
Triton model named as the deployment, with the registry version as Triton's version, which
needs no rewrite, so its requests skip the body filter. A plain HAProxy pass-through (no Lua,
the model's Triton name) shows what HAProxy alone costs. Serving runs with its own data plane
off (``PLINTH_SERVING_DATAPLANE=off``); the three HAProxies share the cores, each idle while
another is measured, and each row's HAProxy CPU is its own process's.

Targets (issue 13, not asserted): at concurrency 32 the data plane keeps >= 90% of direct
Triton's throughput with batching and without, and adds <= 0.3 ms at p50 at concurrency 1;
dynamic batching gives >= 3x no batching through the data plane as it does direct. (The old
Python path's target was >= 70%.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as kserve

from bench.common import Latency, machine_line, ms, print_table, rate, ratio
from plinth.events.v1 import events_pb2
from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth.serving.v1 import serving_pb2, serving_pb2_grpc
from plinth_common.auth import (
    PRINCIPAL_HEADER,
    InternalTokens,
    Principal,
    Role,
    identity_interceptors,
)
from plinth_common.events import new_event
from plinth_common.nats_server import NatsServer
from plinth_common.net import free_tcp_port
from services.serving.dataplane import Backend, DataPlane, KeyGrant, RouteSpec

MODEL = "bench-diabetes"
TEAM = "bench"
#: Who the benchmark calls serving as (the gateway would forward this identity).
CALLER = Principal("bench", teams={TEAM: Role.DEVELOPER}, via="bench")


class _StandInRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """What serving asks the registry here: that the model exists, and (before the promotion
    event arrives) where the alias points. The benchmark measures inference, so the registry
    service and its MLflow stay out of the measured machine's load."""

    async def SearchModels(
        self, request: registry_pb2.SearchModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SearchModelsResponse:
        return registry_pb2.SearchModelsResponse(
            models=[registry_pb2.RegisteredModel(name=MODEL, team=TEAM)]
        )

    async def GetModelVersionByAlias(
        self, request: registry_pb2.GetModelVersionByAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ModelVersion:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no alias yet: the promotion event sets it")
        raise AssertionError("abort raises")


async def _start_registry() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(_StandInRegistry(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


# label -> (deployment, max_queue_delay_microseconds, concurrencies measured)
DEPLOYMENTS = {
    "no batching": ("bench-plain", 0, (1, 32)),
    "batching 500us": ("bench-batched", 500, (1, 32)),
    # A request through serving reaches Triton later and more spread out than a direct one,
    # so a 500 us window collects smaller batches; a wider window shows what batching then
    # recovers (at c=32 only: at c=1 every request would just wait out the window).
    "batching 4ms": ("bench-batched-4ms", 4000, (32,)),
}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    """One (deployment, concurrency, target) point, accumulated over rounds."""

    seconds: float = 0.0
    samples: list[float] = field(default_factory=list)
    errors: int = 0
    cpu: dict[str, float] = field(
        default_factory=dict
    )  # process group -> CPU seconds in the windows

    @property
    def per_s(self) -> float:
        """Requests per second."""
        return len(self.samples) / self.seconds if self.seconds else math.nan

    def cpu_ms(self, group: str) -> float:
        """CPU milliseconds of a process group per request."""
        return (
            self.cpu.get(group, math.nan) * 1000 / len(self.samples) if self.samples else math.nan
        )


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes so far (Linux /proc); gone processes count 0."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Triton and its Python stubs below serving)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pin(pids: list[int], cpus: set[int]) -> None:
    """Restricts every thread of ``pids`` to ``cpus`` (threads and children made later inherit)."""
    for pid in pids:
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in threads:
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(tid, cpus)


def _log_model(tracking_uri: str, artifacts: Path) -> str:
    """Logs the model to an MLflow SQLite store; returns its source URI (``models:/m-...``)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("bench", artifact_location=artifacts.as_uri())
    features, target = load_diabetes(return_X_y=True, as_frame=True)
    estimator = Ridge().fit(features, target)
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.sklearn.log_model(
            estimator,
            name="model",
            signature=infer_signature(features, estimator.predict(features)),
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
        )
    return info.model_uri


def _request(model: str) -> bytes:
    row = np.linspace(-0.05, 0.05, 10, dtype=np.float64).reshape(1, 10)
    request = kserve.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP64"
    tensor.shape.extend(row.shape)
    request.raw_input_contents.append(row.tobytes())
    request.outputs.add().name = "predictions"
    return request.SerializeToString()


async def _measure(
    target: str,
    model: str,
    concurrency: int,
    result: Result,
    *,
    seconds: float,
    warmup: float,
    groups: dict[str, list[int]],
    tokens: InternalTokens | None = None,
    api_key: str | None = None,
) -> None:
    """Runs ``concurrency`` closed-loop callers; records the calls that end inside the window.

    With ``tokens``, every call carries :data:`CALLER`'s forwarded identity (minted once per
    half lifetime, so the cost per call is a dictionary lookup); with ``api_key``, that key as
    a bearer token (what a stock client sends to the data plane).
    """
    payload = _request(model)
    recording = stopping = False
    bearer = None if api_key is None else (("authorization", f"Bearer {api_key}"),)

    def metadata() -> tuple[tuple[str, str], ...] | None:
        if tokens is not None:
            return ((PRINCIPAL_HEADER, tokens.mint(CALLER)),)
        return bearer

    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        kserve.ModelInferResponse.FromString(
            await infer(payload, timeout=30, metadata=metadata())
        )  # fails loudly if broken

        async def caller() -> None:
            while not stopping:
                started = time.perf_counter()
                try:
                    await infer(payload, timeout=30, metadata=metadata())
                except grpc.aio.AioRpcError:
                    result.errors += recording
                    continue
                if recording:
                    result.samples.append(time.perf_counter() - started)

        callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
        try:
            await asyncio.sleep(warmup)
            before = {name: cpu_seconds(pids) for name, pids in groups.items()}
            client_before = time.process_time()
            recording = True
            t0 = time.perf_counter()
            await asyncio.sleep(seconds)
            recording = False
            result.seconds += time.perf_counter() - t0
            for name, pids in groups.items():
                result.cpu[name] = result.cpu.get(name, 0.0) + cpu_seconds(pids) - before[name]
            result.cpu["client"] = (
                result.cpu.get("client", 0.0) + time.process_time() - client_before
            )
        finally:
            stopping = True
            await asyncio.gather(*callers, return_exceptions=True)


async def _wait_serving(
    address: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"serving exited with {process.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"serving not SERVING after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


async def _deploy(
    address: str, nats_url: str, source: str, tokens: InternalTokens, timeout: float = 180
) -> None:
    """Creates the deployments, promotes the version, waits until both serve it."""
    async with grpc.aio.insecure_channel(
        address, interceptors=identity_interceptors(tokens, CALLER)
    ) as channel:
        stub = serving_pb2_grpc.ServingServiceStub(channel)
        for name, delay, _ in DEPLOYMENTS.values():
            settings = serving_pb2.TritonSettings(
                max_batch_size=64, max_queue_delay_microseconds=delay, instance_count=1
            )
            await stub.CreateDeployment(
                serving_pb2.CreateDeploymentRequest(
                    name=name, team=TEAM, model_name=MODEL, triton=settings
                )
            )
        import nats

        promoted = events_pb2.ModelPromoted(
            model_name=MODEL, alias="production", version="1", team=TEAM, source=source
        )
        event = new_event(promoted, source="/plinth/registry", subject=MODEL, team=TEAM)
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().publish(event.type, event.data, headers=event.headers())
        finally:
            await nc.close()
        deadline = time.monotonic() + timeout
        for name, _, _ in DEPLOYMENTS.values():
            while True:
                deployment = await stub.GetDeployment(serving_pb2.GetDeploymentRequest(name=name))
                if deployment.state == serving_pb2.DEPLOYMENT_STATE_READY:
                    break
                if (
                    deployment.state == serving_pb2.DEPLOYMENT_STATE_FAILED
                    or time.monotonic() > deadline
                ):
                    raise RuntimeError(
                        f"{name}: {serving_pb2.DeploymentState.Name(deployment.state)} {deployment.last_error}"
                    )
                await asyncio.sleep(0.2)


def _bench_key() -> tuple[str, KeyGrant]:
    """An API key as the gateway makes them (``plk_<id>_<secret>``) and its grant."""
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    digest = hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()
    deployments = frozenset(name for name, _, _ in DEPLOYMENTS.values())
    return f"plk_{key_id}_{secret}", KeyGrant(key_id, salt, digest, "user:bench", deployments)


async def _start_dataplane(
    work: Path, triton_grpc: str, triton_http: str, key: str, grant: KeyGrant, *, direct: bool
) -> DataPlane:
    """HAProxy in front of Triton, routing every deployment to its version 1 (``direct``: to
    the copy named as the deployment, see :func:`_load_direct_models`)."""
    plane = DataPlane(workdir=work, triton_grpc=triton_grpc, triton_http=triton_http)
    await plane.start()
    await plane.apply_routes(
        [
            RouteSpec(name, (Backend(name if direct else f"{name}__v1", "1", 100, label="1"),))
            for name, _, _ in DEPLOYMENTS.values()
        ]
    )
    await plane.apply_grants([grant])
    return plane


async def _load_direct_models(repository: Path, triton: str) -> None:
    """Copies each deployment's Triton model ``<name>__v1`` to ``<name>`` (version folder 1 = the
    registry version) and loads it: the naming under which the data plane rewrites nothing."""
    from tritonclient.grpc import service_pb2_grpc

    for name, _, _ in DEPLOYMENTS.values():
        target = repository / name
        await asyncio.to_thread(shutil.copytree, repository / f"{name}__v1", target)
        config = target / "config.pbtxt"
        config.write_text(config.read_text().replace(f'"{name}__v1"', f'"{name}"'))
    async with grpc.aio.insecure_channel(triton) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, _, _ in DEPLOYMENTS.values():
            await stub.RepositoryModelLoad(
                kserve.RepositoryModelLoadRequest(model_name=name), timeout=180
            )


def _start_plain_haproxy(work: Path, triton: str) -> tuple[subprocess.Popen[bytes], str]:
    """HAProxy as a plain HTTP/2 pass-through to Triton (no Lua): HAProxy's own cost."""
    port = free_tcp_port()
    config = work / "plain-haproxy.cfg"
    config.write_text(
        "global\n  nbthread 2\n"
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n"
        "  timeout server 1h\n  http-reuse always\n"
        f"frontend plain\n  bind 127.0.0.1:{port} proto h2\n  default_backend triton\n"
        f"backend triton\n  server triton {triton} proto h2\n"
    )
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    return process, f"127.0.0.1:{port}"


# target -> the CPU group whose CPU per request its row shows
_PROXY_GROUP = {
    "dataplane": "haproxy",
    "dataplane direct": "haproxy direct",
    "plain haproxy": "haproxy plain",
}


async def run(quick: bool, *, rounds: int | None = None, pinned: bool = False) -> None:
    """Sets everything up, measures, prints, tears down.

    Args:
        quick: shorter points, one round.
        rounds: rounds per point (default 1 quick, 2 otherwise).
        pinned: Triton (and its Python stubs) on CPU 0, everything else on CPU 1: the proxy
            then takes no CPU from Triton, as where it runs on cores (or nodes) of its own.
    """
    seconds, warmup, default_rounds = (1.5, 0.5, 1) if quick else (3.0, 0.5, 2)
    rounds = rounds or default_rounds
    work = Path(tempfile.mkdtemp(prefix="plinth-bench-inference-"))
    nats_server = NatsServer(work / "nats", sync_interval="2m")
    serving_port, triton_port, triton_http_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    process: subprocess.Popen[bytes] | None = None
    planes: list[DataPlane] = []
    plain_proxy: subprocess.Popen[bytes] | None = None
    registry, registry_address = await _start_registry()
    internal_key = secrets.token_hex(32)
    tokens = InternalTokens(internal_key.encode())
    try:
        t0 = time.perf_counter()
        await nats_server.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLINTH_")}
        env.update(
            PLINTH_DATA_DIR=str(work / "data"),
            PLINTH_NATS_URL=nats_server.url,
            PLINTH_SERVING_PORT=str(serving_port),
            PLINTH_TRITON_GRPC_PORT=str(triton_port),
            PLINTH_TRITON_HTTP_PORT=str(triton_http_port),
            PLINTH_TRITON_MODEL_REPOSITORY=str(work / "models"),
            PLINTH_SERVING_DATAPLANE="off",
            PLINTH_MLFLOW_TRACKING_URI=tracking_uri,
            PLINTH_REGISTRY_ADDR=registry_address,
            PLINTH_INTERNAL_KEY=internal_key,
            PLINTH_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        # Tracing runs in serving as in production (spans made, nothing exported) unless the
        # caller's environment says otherwise.
        env.setdefault("OTEL_TRACES_EXPORTER", "none")
        log_path = work / "serving.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.serving"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        source = await asyncio.to_thread(_log_model, tracking_uri, work / "artifacts")
        address = f"127.0.0.1:{serving_port}"
        await _wait_serving(address, process, log_path)
        await _deploy(address, nats_server.url, source, tokens)
        triton_target = f"127.0.0.1:{triton_port}"
        await _load_direct_models(work / "models", triton_target)
        triton_http = f"127.0.0.1:{triton_http_port}"
        api_key, grant = _bench_key()
        plane = await _start_dataplane(
            work / "dataplane", triton_target, triton_http, api_key, grant, direct=False
        )
        planes.append(plane)
        direct_plane = await _start_dataplane(
            work / "dataplane-direct", triton_target, triton_http, api_key, grant, direct=True
        )
        planes.append(direct_plane)
        plain_proxy, plain_address = _start_plain_haproxy(work, triton_target)
        groups = {
            "serving": [process.pid],
            "triton": descendants(process.pid),
            "haproxy": [plane.pid or 0],
            "haproxy direct": [direct_plane.pid or 0],
            "haproxy plain": [plain_proxy.pid],
        }
        print(machine_line())
        if pinned:
            if (os.cpu_count() or 1) < 2:
                raise SystemExit("--pin needs two CPUs")
            pin(groups["triton"], {0})
            pin(
                [os.getpid(), process.pid]
                + [pids[0] for name, pids in groups.items() if name.startswith("haproxy")],
                {1},
            )
            print(
                "pinned: Triton and its Python stubs on CPU 0; client, serving, HAProxies on CPU 1"
            )
        print(
            f"set-up {time.perf_counter() - t0:.1f}s (nats, serving + Triton, MLflow model, {len(DEPLOYMENTS)} deployments loaded, their direct-named copies, two data planes, plain HAProxy)"
        )
        excluded = os.environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "")
        traced = (
            "off (OTEL_PYTHON_GRPC_EXCLUDED_SERVICES)"
            if "GRPCInferenceService" in excluded
            else "a server span per call (made, not exported)"
        )
        print(f"serving's per-inference tracing: {traced}")
        print(
            f"single-row ModelInfer (1 x 10 FP64) on a Ridge pyfunc in Triton's Python backend; {rounds} round(s) of "
            f"{seconds:.1f}s per point after {warmup:.1f}s warm-up, direct, plain HAProxy, both data planes and the Python path alternating"
        )
        results: dict[tuple[str, int, str], Result] = {}
        for label, (name, _, concurrencies) in DEPLOYMENTS.items():
            for concurrency in concurrencies:
                for _ in range(rounds):
                    for target_label, target, model, identity, key in (
                        ("triton", triton_target, f"{name}__v1", None, None),
                        ("plain haproxy", plain_address, f"{name}__v1", None, None),
                        ("dataplane", plane.grpc_address, name, None, api_key),
                        ("dataplane direct", direct_plane.grpc_address, name, None, api_key),
                        ("python path", address, name, tokens, None),
                    ):
                        result = results.setdefault((label, concurrency, target_label), Result())
                        await _measure(
                            target,
                            model,
                            concurrency,
                            result,
                            seconds=seconds,
                            warmup=warmup,
                            groups=groups,
                            tokens=identity,
                            api_key=key,
                        )
        rows = []
        for (label, concurrency, target_label), result in results.items():
            latency = Latency.of_seconds(result.samples)
            rows.append(
                [
                    f"{label}, c={concurrency}",
                    target_label,
                    rate(result.per_s),
                    ms(latency.p50),
                    ms(latency.p99),
                    ms(result.cpu_ms(_PROXY_GROUP[target_label]))
                    if target_label in _PROXY_GROUP
                    else "-",
                    ms(result.cpu_ms("serving")) if target_label == "python path" else "-",
                    ms(result.cpu_ms("triton")),
                    ms(result.cpu_ms("client")),
                    str(result.errors),
                ]
            )
        print_table(
            "Throughput, latency, and CPU per request of each process",
            [
                "deployment",
                "target",
                "req/s",
                "p50 ms",
                "p99 ms",
                "haproxy CPU ms",
                "serving CPU ms",
                "triton CPU ms",
                "client CPU ms",
                "errors",
            ],
            rows,
        )
        for label, (_, _, concurrencies) in DEPLOYMENTS.items():
            for concurrency in concurrencies:
                direct = results[(label, concurrency, "triton")]
                for path_label, goal in (
                    ("plain haproxy", None),
                    ("dataplane", 0.9),
                    ("dataplane direct", 0.9),
                    ("python path", 0.7),
                ):
                    share = ratio(results[(label, concurrency, path_label)].per_s, direct.per_s)
                    print(
                        f"{path_label} / direct Triton throughput, {label}, c={concurrency}: {share:.0%}"
                        + (f"   (target >= {goal:.0%})" if concurrency == 32 and goal else "")
                    )
                if concurrency == 1:
                    for path_label in ("plain haproxy", "dataplane", "dataplane direct"):
                        added = (
                            Latency.of_seconds(results[(label, 1, path_label)].samples).p50
                            - Latency.of_seconds(direct.samples).p50
                        )
                        print(
                            f"{path_label} p50 added, {label}, c=1: {added:.2f} ms"
                            + ("" if path_label == "plain haproxy" else "   (target <= 0.3 ms)")
                        )
        plain, *batched = list(DEPLOYMENTS)
        for label in batched:
            for target_label in ("triton", "dataplane", "dataplane direct", "python path"):
                gain = ratio(
                    results[(label, 32, target_label)].per_s,
                    results[(plain, 32, target_label)].per_s,
                )
                print(
                    f"{label} / no batching at c=32, {target_label}: {gain:.1f}x   (target >= 3x)"
                )
    finally:
        for running in planes:
            await running.stop()
        if plain_proxy is not None:
            plain_proxy.terminate()
            await asyncio.to_thread(plain_proxy.wait)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        await nats_server.stop()
        await registry.stop(0)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    """``python -m bench.inference [--quick] [--rounds N] [--pin]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1.5 s per point instead of 3 s")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per point")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="Triton on CPU 0, client and proxies on CPU 1 (the proxy takes no CPU from Triton)",
    )
    args = parser.parse_args()
    asyncio.run(run(args.quick, rounds=args.rounds, pinned=args.pin))


if __name__ == "__main__":
    main()
