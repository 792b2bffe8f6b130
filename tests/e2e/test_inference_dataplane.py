"""The native inference data plane on the real platform (every service its own process, as
`make run` starts them; HAProxy launched by serving in front of its Triton): a stock tritonclient
(gRPC, and HTTP with binary tensors) at the data plane's address gets MLflow's own predictions,
a rollout under load loses no request, and an injected failing canary (a version whose predict
raises) is rolled back by itself, with ``deployment.traffic_changed`` saying why."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import nats
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from nats.aio.msg import Msg
from sklearn.datasets import load_diabetes

from plinth.events.v1 import events_pb2
from plinth_common.devstack import LocalPlatform
from plinth_common.events import CloudEvent
from plinth_sdk import Deployment, ModelVersion, NotFound, Plinth
from tests.helpers import eventually

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]
REPO = Path(__file__).resolve().parents[2]
MODEL = "diabetes-dp"
ROWS = load_diabetes(as_frame=True).data.iloc[:5]


@dataclass
class Plane:
    """The platform, an admin client, the data plane's headers and the versions trained."""

    platform: LocalPlatform
    client: Plinth
    versions: list[ModelVersion] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.platform.admin_key}"}


async def _train(plane: Plane, command: list[str], name: str) -> ModelVersion:
    """Runs a training job that registers a version of MODEL, and returns that version."""
    job = await asyncio.to_thread(
        plane.client.jobs.submit,
        name=name,
        team="ml",
        command=command,
        working_dir=str(REPO),
        register_as=MODEL,
    )
    done = await asyncio.to_thread(plane.client.jobs.wait, job.id, timeout=180)
    assert done.state == "SUCCEEDED", done.failure_reason

    async def registered() -> ModelVersion | None:
        try:
            versions = await asyncio.to_thread(plane.client.models.versions, MODEL)
        except NotFound:
            return None
        return next((v for v in versions if v.tags.get("plinth.job_id") == job.id), None)

    return await eventually(registered, timeout=60)


def _ridge(seed: int) -> list[str]:
    return [
        sys.executable,
        "examples/train_diabetes.py",
        "--model",
        "ridge",
        "--seed",
        str(seed),
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(platform: LocalPlatform) -> AsyncIterator[Plane]:
    client = Plinth(platform.address("gateway"), timeout=120, api_key=platform.admin_key)
    held = Plane(platform=platform, client=client)
    held.versions.append(await _train(held, _ridge(1), "dp-v1"))
    await asyncio.to_thread(
        client.deployments.create,
        MODEL,
        team="ml",
        model=MODEL,
        max_batch_size=16,
        max_queue_delay_us=500,
        slo_window_seconds=30,
    )
    await asyncio.to_thread(client.models.promote, MODEL, held.versions[0].version)
    await asyncio.to_thread(
        client.deployments.wait_ready, MODEL, timeout=180, version=held.versions[0].version
    )
    try:
        yield held
    finally:
        client.close()


def _expected(source: str) -> np.ndarray[Any, Any]:
    model = mlflow.pyfunc.load_model(source)
    return np.asarray(model.predict(ROWS), dtype=np.float64).reshape(-1)


async def _ready_on_data_plane(plane: Plane) -> None:
    """Waits until the data plane routes the deployment for the admin's key (grants and routes
    are pushed asynchronously)."""
    grpc_client = triton_grpc.InferenceServerClient(plane.platform.inference_grpc_address)

    async def ready() -> bool:
        try:
            return bool(
                await asyncio.to_thread(grpc_client.is_model_ready, MODEL, headers=plane.auth)
            )
        except Exception:  # noqa: BLE001 - NOT_FOUND until the grant arrives
            return False

    await eventually(ready, timeout=30, interval=0.2)


async def test_stock_tritonclient_grpc_and_http_binary_get_mlflow_predictions(
    plane: Plane,
) -> None:
    mlflow.set_tracking_uri(plane.platform.mlflow_url)
    expected = await asyncio.to_thread(_expected, plane.versions[0].source)
    await _ready_on_data_plane(plane)

    grpc_client = triton_grpc.InferenceServerClient(plane.platform.inference_grpc_address)
    tensor = triton_grpc.InferInput("input", list(ROWS.shape), "FP64")
    tensor.set_data_from_numpy(ROWS.to_numpy(dtype=np.float64))
    result = await asyncio.to_thread(grpc_client.infer, MODEL, [tensor], headers=plane.auth)
    assert np.allclose(result.as_numpy("predictions").reshape(-1), expected)
    # The client sees the deployment's name, never Triton's internal one.
    assert result.get_response().model_name == MODEL

    url = plane.platform.inference_http_url.removeprefix("http://")
    http_client = triton_http.InferenceServerClient(url)
    http_tensor = triton_http.InferInput("input", list(ROWS.shape), "FP64")
    http_tensor.set_data_from_numpy(ROWS.to_numpy(dtype=np.float64), binary_data=True)
    wanted = triton_http.InferRequestedOutput("predictions", binary_data=True)
    reply = await asyncio.to_thread(
        http_client.infer, MODEL, [http_tensor], outputs=[wanted], headers=plane.auth
    )
    assert np.allclose(reply.as_numpy("predictions").reshape(-1), expected)

    # An unknown deployment is NOT_FOUND naming it (through the data plane).
    with pytest.raises(Exception, match="no-such-deployment"):
        await asyncio.to_thread(
            grpc_client.infer, "no-such-deployment", [tensor], headers=plane.auth
        )


@dataclass
class Load:
    """Callers of ModelInfer through the data plane, counting what came back."""

    ok: int = 0
    failed: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)


async def _load(plane: Plane, stop: asyncio.Event, load: Load, callers: int = 4) -> None:
    async def caller() -> None:
        client = triton_aio.InferenceServerClient(plane.platform.inference_grpc_address)
        tensor = triton_aio.InferInput("input", list(ROWS.shape), "FP64")
        tensor.set_data_from_numpy(ROWS.to_numpy(dtype=np.float64))
        try:
            while not stop.is_set():
                try:
                    result = await client.infer(
                        MODEL, [tensor], headers=plane.auth, client_timeout=30
                    )
                except Exception as exc:  # noqa: BLE001 - counted: the test says which
                    load.failed.append(str(exc)[:200])
                    await asyncio.sleep(0.01)
                    continue
                load.ok += 1
                version = result.get_response().model_version
                load.versions[version] = load.versions.get(version, 0) + 1
        finally:
            await client.close()

    await asyncio.gather(*(caller() for _ in range(callers)))


async def test_a_rollout_under_load_loses_no_request(plane: Plane) -> None:
    await _ready_on_data_plane(plane)
    v2 = await _train(plane, _ridge(2), "dp-v2")
    plane.versions.append(v2)
    stop, load = asyncio.Event(), Load()
    running = asyncio.create_task(_load(plane, stop, load))
    try:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(plane.client.models.promote, MODEL, v2.version)
        await asyncio.to_thread(
            plane.client.deployments.wait_ready, MODEL, timeout=180, version=v2.version
        )
        # The old version unloads after the drain delay; keep calling past it.
        await asyncio.sleep(3.0)
    finally:
        stop.set()
        await running
    assert load.failed == [], load.failed[:5]
    assert load.ok > 100
    old = plane.versions[0].version
    assert load.versions.get(old, 0) > 0 and load.versions.get(v2.version, 0) > 0
    shown: Deployment = await asyncio.to_thread(plane.client.deployments.get, MODEL)
    assert shown.split == {v2.version: 100}
    [row] = shown.traffic
    assert row.measured and row.requests_per_second > 0


async def test_a_failing_canary_is_rolled_back_by_itself(plane: Plane) -> None:
    await _ready_on_data_plane(plane)
    stable = (await asyncio.to_thread(plane.client.deployments.get, MODEL)).serving_version
    failing = await _train(plane, [sys.executable, "tests/e2e/jobs/failing_model.py"], "dp-failing")
    nc = await nats.connect(plane.platform.nats_url)
    changes: list[events_pb2.DeploymentTrafficChanged] = []

    async def keep(msg: Msg) -> None:
        payload = CloudEvent.from_headers(msg.headers, msg.data).payload()
        if isinstance(payload, events_pb2.DeploymentTrafficChanged) and payload.deployment == MODEL:
            changes.append(payload)

    await nc.subscribe("plinth.deployment.traffic_changed", cb=keep)
    await nc.flush()
    stop, load = asyncio.Event(), Load()
    try:
        split = await asyncio.to_thread(
            plane.client.deployments.set_traffic,
            MODEL,
            {failing.version: 20, stable: 80},
            reason="canary of the failing version",
        )
        assert split.split == {stable: 80, failing.version: 20}
        began = time.monotonic()
        running = asyncio.create_task(_load(plane, stop, load))

        async def rolled_back() -> Deployment | None:
            shown = await asyncio.to_thread(plane.client.deployments.get, MODEL)
            return shown if shown.split == {stable: 100} else None

        try:
            shown = await eventually(rolled_back, timeout=60, interval=0.5)
        finally:
            stop.set()
            await running
        took = time.monotonic() - began

        async def event_seen() -> bool:
            return any(c.reason.startswith("rollback:") for c in changes)

        await eventually(event_seen, timeout=10)
    finally:
        await nc.close()
    assert shown.serving_version == stable
    assert load.failed, "the canary's errors reached the callers before the rollback"
    # Triton's own answer for a model that raises, unchanged: no garbled message, no reset stream
    own = "[StatusCode.INTERNAL] prediction failed: RuntimeError: injected failure"
    assert all(failure.startswith(own) for failure in load.failed), set(load.failed)
    assert load.ok > len(load.failed)
    requested, rollback = changes[0], changes[-1]
    assert dict(requested.traffic_percent) == {stable: 80, failing.version: 20}
    assert requested.actor and requested.reason == "SetTraffic: canary of the failing version"
    assert dict(rollback.previous_traffic_percent) == {stable: 80, failing.version: 20}
    assert dict(rollback.traffic_percent) == {stable: 100}
    assert rollback.reason.startswith(f"rollback: canary v{failing.version} error rate")
    assert rollback.actor == "serving"
    print(f"failing canary rolled back {took:.1f}s after its traffic began")
