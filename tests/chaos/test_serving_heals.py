"""Chaos: serving heals its engine and survives its own death mid-rollout.

- Triton killed (``kill -9`` of ``tritonserver``) under inference load: serving restarts it,
  reloads the deployment, and inference recovers without anyone acting within a stated bound;
  no request gets a wrong answer (every success is the model's prediction, every failure is
  UNAVAILABLE naming the serving engine); the deployment shows UNAVAILABLE meanwhile, health
  NOT_SERVING, and exactly one ``deployment.ready`` with ``recovered`` follows.
- Serving killed (``kill -9`` of the serving process) while a promotion's load runs: restarted
  as a supervisor would, it restores the old version and completes the rollout; inference only
  ever answers the old or the new version's prediction, and ``deployment.ready`` for the new
  version is published exactly once.

Serving runs as a process (``python -m services.serving``) with its embedded Triton, a real
nats-server, and a small fake registry; versions are two tiny MLflow models saved to local
folders (``file:`` sources) that predict ``2x`` and ``3x``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import nats
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from plinth.events.v1 import events_pb2
from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth.serving.v1 import serving_pb2 as pb
from plinth.serving.v1 import serving_pb2_grpc
from plinth_common.auth import ServiceAuthInterceptor
from plinth_common.events import CloudEvent, new_event
from plinth_common.nats_server import NatsServer
from plinth_common.net import free_tcp_port
from plinth_common.process import ChildProcess
from tests.helpers import (
    TEST_INTERNAL_KEY,
    TEST_TOKENS,
    EventRecorder,
    TritonIdentity,
    channel_as,
    eventually,
)

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="session")]

MODEL = "tiny"
SLOPES = {"1": 2.0, "2": 3.0}  # version -> what it predicts for x
STARTUP_BOUND_S = 90.0
# Kill -> every worker answered correctly again: Triton's restart (~2 s), the reload of one
# tiny model (its Python stub imports MLflow: a few seconds on a busy machine), and slack.
TRITON_RECOVERY_BOUND_S = 45.0
# Kill -> the restarted serving answers again (old version restored), and -> the new version
# READY: a serving start, a Triton start and one or two model loads.
SERVING_RECOVERY_BOUND_S = 60.0
ROLLOUT_BOUND_S = 90.0
_WORKERS = 4
_ROWS = np.array([[1.0], [2.5], [-4.0]])
T = TypeVar("T")


# -- the world around serving -------------------------------------------------------------------


def _save_versions(root: Path) -> dict[str, str]:
    """Saves one tiny linear model per version; returns version -> ``file:`` source."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow.sklearn
    import pandas as pd
    import sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LinearRegression

    features = pd.DataFrame({"x": np.arange(8, dtype=float)})
    sources = {}
    for version, slope in SLOPES.items():
        estimator = LinearRegression().fit(features, slope * features["x"])
        path = root / f"v{version}"
        mlflow.sklearn.save_model(
            estimator,
            str(path),
            signature=infer_signature(features, estimator.predict(features)),
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
        )
        sources[version] = path.resolve().as_uri()
    return sources


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """The registry calls serving makes: does the model exist, where does its alias point."""

    def __init__(self) -> None:
        self.aliases: dict[str, registry_pb2.ModelVersion] = {}

    async def SearchModels(
        self, request: registry_pb2.SearchModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SearchModelsResponse:
        return registry_pb2.SearchModelsResponse(
            models=[registry_pb2.RegisteredModel(name=MODEL, team="ml")]
        )

    async def GetModelVersionByAlias(
        self, request: registry_pb2.GetModelVersionByAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ModelVersion:
        version = self.aliases.get(request.alias)
        if version is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no alias {request.alias!r}")
        return version


@dataclass
class World:
    root: Path
    nats_url: str
    registry: FakeRegistry
    registry_addr: str
    sources: dict[str, str]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer
) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("serving-chaos")
    sources = await asyncio.to_thread(_save_versions, root / "versions")
    fake = FakeRegistry()
    server = grpc.aio.server(interceptors=[ServiceAuthInterceptor(TEST_TOKENS)])
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield World(root, nats_server.url, fake, f"127.0.0.1:{port}", sources)
    finally:
        await server.stop(0)


def _version(world: World, version: str) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        name=MODEL, version=version, source=world.sources[version], run_id=f"run-{version}"
    )


# -- serving as a process -----------------------------------------------------------------------


@dataclass
class ServingProcess:
    """``python -m services.serving`` with its own data folder, on a fixed port."""

    child: ChildProcess
    port: int
    data_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def triton_pid(self) -> int:
        """The ``tritonserver`` that this serving process launched."""
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_bytes()
            except OSError:
                continue
            comm = stat[stat.find(b"(") + 1 : stat.rfind(b")")]
            fields = stat[stat.rfind(b")") + 2 :].split()
            if comm == b"tritonserver" and int(fields[1]) == self.child.pid and fields[0] != b"Z":
                return int(entry.name)
        raise AssertionError(f"no tritonserver child of serving pid {self.child.pid}")

    async def wait_serving(self, timeout: float = STARTUP_BOUND_S) -> None:
        async def probe() -> bool:
            return await _health(self.address) == health_pb2.HealthCheckResponse.SERVING

        await self.child.wait_ready(probe, timeout=timeout, poll_interval=0.2, what="SERVING")


def _serving_process(world: World, name: str) -> ServingProcess:
    data_dir = world.root / name
    port = free_tcp_port()
    env = dict(os.environ) | {
        "PLINTH_DATA_DIR": str(data_dir),
        "PLINTH_NATS_URL": world.nats_url,
        "PLINTH_SERVING_PORT": str(port),
        "PLINTH_INTERNAL_KEY": TEST_INTERNAL_KEY,
        "PLINTH_REGISTRY_ADDR": world.registry_addr,
        "PLINTH_MLFLOW_TRACKING_URI": (world.root / "mlruns").as_uri(),
        "PLINTH_SERVING_ARTIFACT_SCHEMES": "file",
        "PLINTH_SERVING_UNLOAD_GRACE_S": "0.1",
    }
    env.pop("PLINTH_TRITON_URL", None)
    child = ChildProcess(
        [sys.executable, "-m", "services.serving"],
        name="serving",
        env=env,
        log_path=data_dir / "serving.log",
        own_group=True,
        stop_grace_s=20.0,
    )
    return ServingProcess(child=child, port=port, data_dir=data_dir)


@pytest_asyncio.fixture(loop_scope="session")
async def start_serving(world: World) -> AsyncIterator[list[ServingProcess]]:
    """Serving processes a test starts; each is stopped (with its Triton) afterwards."""
    started: list[ServingProcess] = []
    try:
        yield started
    finally:
        for process in started:
            await process.child.stop()
            assert not process.child.alive


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="plinth.serving.v1.ServingService"),
                timeout=2,
            )
        except grpc.aio.AioRpcError:
            return -1
        return int(answer.status)


async def _get(address: str, name: str) -> pb.Deployment:
    async with channel_as(address) as channel:
        stub = serving_pb2_grpc.ServingServiceStub(channel)
        return await stub.GetDeployment(pb.GetDeploymentRequest(name=name), timeout=5)


async def _create(address: str, name: str) -> None:
    async with channel_as(address) as channel:
        stub = serving_pb2_grpc.ServingServiceStub(channel)
        await stub.CreateDeployment(
            pb.CreateDeploymentRequest(name=name, team="ml", model_name=MODEL), timeout=30
        )


async def _wait_state(address: str, name: str, *, version: str, timeout: float) -> pb.Deployment:
    async def probe() -> pb.Deployment | None:
        try:
            d = await _get(address, name)
        except grpc.aio.AioRpcError:
            return None
        ready = d.state == pb.DEPLOYMENT_STATE_READY and d.serving_version == version
        return d if ready else None

    return await eventually(probe, timeout=timeout, interval=0.2)


async def _promote(world: World, version: str) -> None:
    world.registry.aliases["production"] = _version(world, version)
    payload = events_pb2.ModelPromoted(
        model_name=MODEL,
        alias="production",
        version=version,
        team="ml",
        source=world.sources[version],
        run_id=f"run-{version}",
    )
    event = new_event(payload, source="/plinth/registry", subject=MODEL, team="ml")
    nc = await nats.connect(world.nats_url)
    try:
        await nc.jetstream().publish(event.type, event.data, headers=event.headers())
    finally:
        await nc.close()


def _ready_events(recorder: EventRecorder, deployment: str) -> list[events_pb2.DeploymentReady]:
    found = []
    for m in recorder.messages:
        if m.subject != "plinth.deployment.ready":
            continue
        payload = CloudEvent.from_headers(m.headers, m.data).payload()
        if isinstance(payload, events_pb2.DeploymentReady) and payload.deployment == deployment:
            found.append(payload)
    return found


# -- inference under load -----------------------------------------------------------------------


@dataclass
class Tally:
    """What the load saw: answers per version, failures per code, wrong answers, and when."""

    answers: Counter[str]
    failures: Counter[str]
    wrong: list[str]
    last_failure: float = 0.0
    first_failure: float = 0.0


def _which_version(out: np.ndarray) -> str | None:
    for version, slope in SLOPES.items():
        if np.allclose(out.reshape(-1), slope * _ROWS.reshape(-1), atol=1e-6):
            return version
    return None


async def _infer_loop(
    address: str, deployment: str, tally: Tally, stop: asyncio.Event, allowed: set[str]
) -> None:
    client = triton_aio.InferenceServerClient(address)
    client.register_plugin(TritonIdentity())
    try:
        while not stop.is_set():
            tensor = triton_aio.InferInput("input", list(_ROWS.shape), "FP64")
            tensor.set_data_from_numpy(_ROWS)
            try:
                result = await client.infer(deployment, [tensor], client_timeout=15)
            except InferenceServerException as exc:
                now = time.monotonic()
                tally.first_failure = tally.first_failure or now
                tally.last_failure = now
                code = str(exc.status() or "")
                tally.failures[code] += 1
                if "UNAVAILABLE" not in code:
                    tally.wrong.append(f"{code}: {exc.message()}")
                # What a client does with RetryInfo: wait a little, ask again.
                await asyncio.sleep(0.2)
                continue
            out = result.as_numpy("predictions")
            version = None if out is None else _which_version(out)
            if version is None or version not in allowed:
                tally.wrong.append(f"answer {out!r} is no allowed version's prediction")
            else:
                tally.answers[version] += 1
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _load(
    address: str, deployment: str, allowed: set[str]
) -> AsyncIterator[tuple[Tally, asyncio.Event]]:
    tally = Tally(answers=Counter(), failures=Counter(), wrong=[])
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(_infer_loop(address, deployment, tally, stop, allowed))
        for _ in range(_WORKERS)
    ]
    try:
        yield tally, stop
    finally:
        stop.set()
        await asyncio.gather(*workers)


async def _answers_again(tally: Tally, since: float, *, timeout: float, at_least: int) -> float:
    """Waits until every worker has answered correctly after ``since`` (no failure in the last
    ``at_least`` answers); returns the time of the last failure (recovery point)."""
    start_total = sum(tally.answers.values())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answered = sum(tally.answers.values()) - start_total >= at_least
        quiet = time.monotonic() - tally.last_failure > 1.0
        if tally.last_failure > since and answered and quiet:
            return tally.last_failure
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"inference did not recover within {timeout:.0f}s: {tally.failures} {tally.answers}"
    )


async def _until(condition: Callable[[], T], *, timeout: float) -> T:
    """Waits until ``condition()`` is truthy (a synchronous check) and returns it."""

    async def probe() -> T | None:
        value = condition()
        return value if value else None

    return await eventually(probe, timeout=timeout, interval=0.05)


# -- the tests ----------------------------------------------------------------------------------


async def test_triton_killed_under_inference_load(
    world: World, start_serving: list[ServingProcess], nats_server: NatsServer
) -> None:
    serving = _serving_process(world, "triton-killed")
    start_serving.append(serving)
    serving.child.start()
    await serving.wait_serving()
    world.registry.aliases["production"] = _version(world, "1")
    await _create(serving.address, "tiny")
    await _wait_state(serving.address, "tiny", version="1", timeout=STARTUP_BOUND_S)

    async with (
        EventRecorder(nats_server.url) as recorder,
        _load(serving.address, "tiny", {"1"}) as (tally, _stop),
    ):
        await _until(lambda: sum(tally.answers.values()) >= 20, timeout=30)
        before = sum(tally.answers.values())
        triton = serving.triton_pid()
        killed_at = time.monotonic()
        os.kill(triton, signal.SIGKILL)

        # While it is down: the deployment says so, and health is NOT_SERVING.
        shown = await eventually(
            lambda: _shown_unavailable(serving.address), timeout=10, interval=0.05
        )
        assert "serving engine is down" in shown.last_error, shown.last_error
        assert "SIGKILL" in shown.last_error, shown.last_error

        # Nobody acts: Triton is restarted and the deployment reloaded.
        await _wait_state(serving.address, "tiny", version="1", timeout=TRITON_RECOVERY_BOUND_S)
        await _answers_again(
            tally, killed_at, timeout=TRITON_RECOVERY_BOUND_S, at_least=_WORKERS * 5
        )
        recovered_in = tally.last_failure - killed_at
        assert await _health(serving.address) == health_pb2.HealthCheckResponse.SERVING
        assert serving.triton_pid() != triton
        recovered = await _until(
            lambda: [e for e in _ready_events(recorder, "tiny") if e.recovered], timeout=10
        )
        await asyncio.sleep(1.0)  # a duplicate would be relayed by now (the outbox relays at once)
        recovered = [e for e in _ready_events(recorder, "tiny") if e.recovered]

    print(
        f"\n[chaos] Triton killed under load: recovered in {recovered_in:.1f}s "
        f"(bound {TRITON_RECOVERY_BOUND_S:.0f}s); answers {sum(tally.answers.values())} "
        f"({before} before the kill), failures {dict(tally.failures)} (UNAVAILABLE only), "
        f"wrong answers {len(tally.wrong)}, recovery events {len(recovered)} (lost 0, "
        f"duplicates {len(recovered) - 1})",
        flush=True,
    )
    assert tally.wrong == []
    assert set(tally.failures) <= {"StatusCode.UNAVAILABLE"}, tally.failures
    assert recovered_in <= TRITON_RECOVERY_BOUND_S
    assert [e.version for e in recovered] == ["1"]


async def _shown_unavailable(address: str) -> pb.Deployment | None:
    try:
        d = await _get(address, "tiny")
    except grpc.aio.AioRpcError:
        return None
    if d.state != pb.DEPLOYMENT_STATE_UNAVAILABLE:
        return None
    # Health follows (set just after the state shows): both at once, or look again.
    if await _health(address) != health_pb2.HealthCheckResponse.NOT_SERVING:
        return None
    return d


async def test_serving_killed_mid_rollout(
    world: World, start_serving: list[ServingProcess], nats_server: NatsServer
) -> None:
    serving = _serving_process(world, "serving-killed")
    start_serving.append(serving)
    serving.child.start()
    await serving.wait_serving()
    world.registry.aliases["production"] = _version(world, "1")
    await _create(serving.address, "tiny")
    await _wait_state(serving.address, "tiny", version="1", timeout=STARTUP_BOUND_S)

    async with (
        EventRecorder(nats_server.url) as recorder,
        _load(serving.address, "tiny", {"1", "2"}) as (tally, _stop),
    ):
        await _until(lambda: sum(tally.answers.values()) >= 10, timeout=30)
        await _promote(world, "2")

        async def loading() -> bool:
            d = await _get(serving.address, "tiny")
            return d.loading_version == "2"

        await eventually(loading, timeout=30, interval=0.02)
        killed_at = time.monotonic()
        os.kill(serving.child.pid or 0, signal.SIGKILL)
        await serving.child.wait(10)

        # A supervisor's restart (the platform's restarts a service that exits unexpectedly).
        serving.child.start()
        await serving.wait_serving(timeout=SERVING_RECOVERY_BOUND_S)
        done = await _wait_state(serving.address, "tiny", version="2", timeout=ROLLOUT_BOUND_S)
        rolled_out_in = time.monotonic() - killed_at
        await _answers_again(tally, killed_at, timeout=SERVING_RECOVERY_BOUND_S, at_least=8)
        down_for = tally.last_failure - killed_at
        # The new version answers from now on.
        served_by_2 = tally.answers["2"]
        await _until(lambda: tally.answers["2"] >= served_by_2 + 8, timeout=15)
        await _until(
            lambda: [e for e in _ready_events(recorder, "tiny") if e.version == "2"], timeout=10
        )
        await asyncio.sleep(1.0)  # a duplicate would be relayed by now (the outbox relays at once)
        readies = [e for e in _ready_events(recorder, "tiny") if e.version == "2"]

    print(
        f"\n[chaos] serving killed mid-rollout: answering again after {down_for:.1f}s "
        f"(bound {SERVING_RECOVERY_BOUND_S:.0f}s), v2 READY after {rolled_out_in:.1f}s "
        f"(bound {ROLLOUT_BOUND_S:.0f}s); answers {dict(tally.answers)}, failures "
        f"{dict(tally.failures)}, wrong answers {len(tally.wrong)}; deployment.ready v2 "
        f"events {len(readies)} (lost 0, duplicates {len(readies) - 1})",
        flush=True,
    )
    assert done.serving_version == "2"
    assert tally.wrong == []
    assert set(tally.failures) <= {"StatusCode.UNAVAILABLE"}, tally.failures
    assert down_for <= SERVING_RECOVERY_BOUND_S
    assert len(readies) == 1
