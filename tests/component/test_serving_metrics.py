"""Serving's metrics against what really happened: a real Triton (with its metrics port) loading
a real MLflow model, the real HAProxy data plane, the real reconciler on a SQLite store, and
serving's metrics served on a real port and scraped over HTTP. After a scripted workload of
successful and failing inferences through a stock tritonclient, the scraped counts equal what
the client saw, exactly; latencies sit in buckets consistent with the client's own timings;
Triton's ``nv_inference_*`` carry the deployment; a completed rollout is counted; and an
HAProxy crash does not make the counters go down.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cloudpickle
import mlflow.pyfunc
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as triton_grpc
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from sklearn.datasets import load_diabetes
from tritonclient.grpc import service_pb2 as kserve

from plinth_common.auth import acting_as
from plinth_common.db import Database
from plinth_common.errors import InvalidArgument, PlinthError
from plinth_common.metrics import INFERENCE_BUCKETS_S, Metrics
from plinth_common.net import free_tcp_port
from services.serving.app import MIGRATIONS, _route_specs
from services.serving.dataplane import DataPlane, KeyGrant
from services.serving.dataplane.tables import LATENCY_BOUNDS_MS
from services.serving.domain import (
    BatchingSettings,
    DeploymentSpec,
    DeploymentState,
    Promotion,
    Split,
)
from services.serving.inference import InferenceProxy
from services.serving.metrics import MetricsReading, ServingMetrics, read_plane
from services.serving.reconciler import Reconciler
from services.serving.service import ServingService
from services.serving.store import DeploymentStore
from services.serving.triton import ModelRepository, TritonModels, TritonProcess, TritonSettings
from tests.helpers import ADMIN, eventually
from tests.unit.serving.fakes import FakeEvents, FakeRegistry

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(not DataPlane.available()[0], reason=DataPlane.available()[1]),
    pytest.mark.timeout(600),
]
MODEL = "diabetes"
DEPLOYMENT = "scored"
ROWS = load_diabetes(as_frame=True).data.iloc[:2]
#: A row whose ``age`` is this makes the model raise: a server error for that request.
POISON = 1000.0
_T0 = datetime(2026, 1, 1, tzinfo=UTC)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FailsOnPoison(PythonModel):  # type: ignore[misc]
    """Sums each row; raises when a row's age is POISON (the injected server error)."""

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
        if (model_input["age"] >= POISON).any():
            raise RuntimeError("injected failure: poisoned row")
        return model_input.sum(axis=1).to_numpy()


def _save_model(root: Path) -> Path:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    path = root / "v1"
    mlflow.pyfunc.save_model(
        path, python_model=FailsOnPoison(), signature=infer_signature(ROWS, np.zeros(len(ROWS)))
    )
    return path


class LocalArtifacts:
    def __init__(self, saved: Path) -> None:
        self._saved = saved

    async def download(self, source: str, dst: Path) -> Path:
        await asyncio.to_thread(shutil.copytree, self._saved, dst)
        return dst


class Registry(FakeRegistry):
    async def version(self, model_name: str, version: str) -> Any:
        ref = await super().version(model_name, version)
        return type(ref)(version=version, source=f"local:{version}", run_id=ref.run_id)


@dataclass
class Stack:
    dp: DataPlane
    metrics: Metrics
    headers: dict[str, str]
    service: ServingService
    triton_target: str
    serving_metrics: ServingMetrics

    def scrape(self) -> Samples:
        """GET serving's /metrics, as Prometheus would (blocking)."""
        url = f"http://127.0.0.1:{self.metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("serving-metrics")
    saved = await asyncio.to_thread(_save_model, root / "saved")
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_tcp_port())
    grpc_port, http_port, metrics_port = sorted(ports)
    (root / "models").mkdir()
    triton = TritonProcess(
        TritonSettings(
            model_repository=root / "models",
            work_dir=root / "work",
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
        )
    )
    dp = DataPlane(
        workdir=root / "dp", triton_grpc=triton.grpc_target, triton_http=f"127.0.0.1:{http_port}"
    )
    db = Database(f"sqlite+aiosqlite:///{root / 'serving.db'}")
    await db.migrate(MIGRATIONS)
    models = TritonModels(triton.grpc_target, load_timeout_s=180)

    async def publish(splits: Sequence[Split]) -> None:
        await dp.apply_routes(_route_specs(splits))

    metrics = Metrics("serving")
    holder: dict[str, Reconciler] = {}

    async def read() -> MetricsReading:
        # As ServingApp reads them at a scrape.
        return await read_plane(
            dp,
            holder["reconciler"].routed_models(),
            bounds_ms=LATENCY_BOUNDS_MS,
            latency_target_s=lambda deployment: 0.1,
        )

    serving_metrics = ServingMetrics(
        metrics,
        read=read,
        latency_target_s=lambda deployment: 0.1,
        triton_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    store, events, registry = DeploymentStore(), FakeEvents(), Registry([MODEL])
    repository = ModelRepository(root / "models")
    reconciler = Reconciler(
        db=db,
        store=store,
        events=events,
        repository=repository,
        artifacts=LocalArtifacts(saved),
        models=models,
        registry=registry,
        unload_grace_s=0.2,
        reconcile_interval_s=0.5,
        publisher=publish,
        direct=repository,  # as the app wires it with a data plane
        on_rollout=serving_metrics.rollout,
    )
    holder["reconciler"] = reconciler
    service = ServingService(
        db=db, store=store, events=events, registry=registry, reconciler=reconciler
    )
    secret, salt, key_id = secrets.token_urlsafe(24), secrets.token_hex(8), secrets.token_hex(6)
    grant = KeyGrant(
        key_id,
        salt,
        hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest(),
        "user:ann",
        frozenset({DEPLOYMENT}),
        None,
    )
    serving_metrics.bind(asyncio.get_running_loop())
    await metrics.serve("127.0.0.1", 0)
    await triton.start()
    try:
        await triton.wait_ready()
        await dp.start()
        await dp.apply_grants([grant])
        await reconciler.start()
        await service.create(
            ADMIN,
            DeploymentSpec(
                name=DEPLOYMENT,
                team="ml",
                model_name=MODEL,
                # No batching: a poisoned request fails alone.
                batching=BatchingSettings(max_batch_size=8, max_queue_delay_us=0, instance_count=0),
            ),
        )
        promotion = Promotion(
            model_name=MODEL,
            alias="production",
            version="1",
            source="local:1",
            run_id="r",
            time=_T0,
        )
        async with db.transaction() as session:
            await service.on_promoted(session, promotion)

        async def serving() -> bool:
            d = await service.get(ADMIN, DEPLOYMENT)
            return d.serving_version == "1" and d.state is DeploymentState.READY

        await eventually(serving, timeout=180, interval=0.2)

        async def direct() -> bool:
            # Serving alone, the version answers as the deployment's own Triton model.
            return reconciler.routed_models() == {f"{DEPLOYMENT}/1": DEPLOYMENT}

        await eventually(direct, timeout=60, interval=0.2)
        yield Stack(
            dp,
            metrics,
            {"authorization": f"Bearer plk_{key_id}_{secret}"},
            service,
            triton.grpc_target,
            serving_metrics,
        )
    finally:
        await reconciler.stop()
        await models.close()
        await dp.stop()
        await triton.stop()
        await metrics.close()
        await db.close()


def _workload(stack: Stack, good: int, bad: int) -> tuple[int, int, list[float]]:
    """``good`` then ``bad`` (poisoned) inferences through the data plane, one at a time;
    (answered, failed, each request's latency as the client saw it)."""
    client = triton_grpc.InferenceServerClient(stack.dp.grpc_address)
    rows = ROWS.to_numpy(dtype=np.float64)
    poisoned = rows.copy()
    poisoned[:, list(ROWS.columns).index("age")] = POISON
    ok = failed = 0
    latencies: list[float] = []
    try:
        for data in [rows] * good + [poisoned] * bad:
            tensor = triton_grpc.InferInput("input", list(data.shape), "FP64")
            tensor.set_data_from_numpy(data)
            began = time.perf_counter()
            try:
                client.infer(DEPLOYMENT, [tensor], headers=stack.headers)
                ok += 1
            except triton_grpc.InferenceServerException:
                failed += 1
            latencies.append(time.perf_counter() - began)
    finally:
        client.close()
    return ok, failed, latencies


LABELS = (("deployment", DEPLOYMENT), ("version", "1"))


def _bucket(samples: Samples, le: str) -> float:
    key = (("deployment", DEPLOYMENT), ("le", le), ("version", "1"))
    return samples.get(("plinth_serving_inference_request_duration_seconds_bucket", key), 0.0)


def _value(samples: Samples, name: str) -> float:
    return samples.get((name, LABELS), 0.0)


async def test_scraped_figures_equal_the_scripted_workload(stack: Stack) -> None:
    before = await asyncio.to_thread(stack.scrape)
    assert before[("plinth_serving_rollouts_total", (("outcome", "completed"),))] == 1
    ok, failed, latencies = await asyncio.to_thread(_workload, stack, 25, 5)
    assert (ok, failed) == (25, 5)  # the model fails exactly the poisoned ones
    after = await asyncio.to_thread(stack.scrape)

    def delta(name: str) -> float:
        return _value(after, name) - _value(before, name)

    assert delta("plinth_serving_inference_requests_total") == 30
    assert delta("plinth_serving_inference_errors_total") == 5
    count = "plinth_serving_inference_request_duration_seconds_count"
    assert delta(count) == 30
    # The proxy's latency of a request is inside the client's: at each bound, at least as many
    # requests as the client saw within it (all of them at +Inf); the sum at most the client's.
    assert _bucket(after, "+Inf") == _value(after, count)
    for bound in INFERENCE_BUCKETS_S:
        le = floatToGoString(bound)
        within = sum(1 for seconds in latencies if seconds <= bound)
        grew = _bucket(after, le) - _bucket(before, le)
        assert grew >= within, (le, grew, within)
    summed = delta("plinth_serving_inference_request_duration_seconds_sum")
    assert 0 < summed <= sum(latencies)
    slow_by_client = sum(1 for s in latencies if s > 0.1)
    assert delta("plinth_serving_inference_slow_requests_total") <= slow_by_client
    # Triton's own figures, relabelled by deployment and version (no Triton model name left).
    assert (
        _value(after, "nv_inference_request_success")
        - _value(before, "nv_inference_request_success")
        == 25
    )
    assert (
        _value(after, "nv_inference_request_failure")
        - _value(before, "nv_inference_request_failure")
        == 5
    )
    assert not any(
        dict(labels).get("model") for name, labels in after if name.startswith("nv_inference_")
    )
    print(
        f"scraped: {delta('plinth_serving_inference_requests_total'):.0f} requests, "
        f"{delta('plinth_serving_inference_errors_total'):.0f} errors; client p50 "
        f"{sorted(latencies)[len(latencies) // 2] * 1000:.2f} ms, proxy mean "
        f"{summed / 30 * 1000:.2f} ms"
    )


async def test_counters_do_not_go_down_when_haproxy_crashes(stack: Stack) -> None:
    before = await asyncio.to_thread(stack.scrape)
    first_pid = stack.dp.pid
    stack.dp.kill_for_test()

    async def dead() -> bool:
        return stack.dp.exited() is not None

    await eventually(dead, timeout=10)
    down = await asyncio.to_thread(stack.scrape)  # HAProxy is gone: the last totals stand
    assert _value(down, "plinth_serving_inference_requests_total") == _value(
        before, "plinth_serving_inference_requests_total"
    )
    await stack.dp.start()  # what the healer does; routes and grants are pushed again
    assert stack.dp.pid != first_pid
    ok, failed, _ = await asyncio.to_thread(_workload, stack, 4, 1)
    assert (ok, failed) == (4, 1)
    after = await asyncio.to_thread(stack.scrape)
    for name, grew in (
        ("plinth_serving_inference_requests_total", 5),
        ("plinth_serving_inference_errors_total", 1),
        ("plinth_serving_inference_request_duration_seconds_count", 5),
    ):
        assert _value(after, name) - _value(before, name) == grew, name


class _Context:
    """The part of a servicer context the Python path reads."""

    def time_remaining(self) -> float | None:
        return None


def _kserve_request(data: np.ndarray[Any, Any]) -> bytes:
    request = kserve.ModelInferRequest(model_name=DEPLOYMENT)
    request.inputs.add(name="input", datatype="FP64", shape=list(data.shape))
    request.raw_input_contents.append(data.astype(np.float64).tobytes())
    return bytes(request.SerializeToString())


async def test_the_python_path_counts_each_request_beside_the_data_plane(stack: Stack) -> None:
    """The fallback path (no HAProxy) to the same Triton: its requests add to the same
    deployment version's series, a wrong tensor is a request but not an error."""
    before = await asyncio.to_thread(stack.scrape)
    proxy = InferenceProxy(
        stack.service, stack.triton_target, recorder=stack.serving_metrics.python_path
    )
    rows = ROWS.to_numpy(dtype=np.float64)
    poisoned = rows.copy()
    poisoned[:, list(ROWS.columns).index("age")] = POISON
    outcomes: list[str] = []
    try:
        with acting_as(ADMIN):
            for data in [rows] * 6 + [poisoned] * 2 + [rows[:, :3]]:
                try:
                    await proxy.model_infer(_kserve_request(data), _Context())  # type: ignore[arg-type]
                    outcomes.append("ok")
                except InvalidArgument:
                    outcomes.append("client")
                except PlinthError:
                    outcomes.append("server")
    finally:
        await proxy.close()
    assert outcomes == ["ok"] * 6 + ["server"] * 2 + ["client"]
    after = await asyncio.to_thread(stack.scrape)
    for name, grew in (
        ("plinth_serving_inference_requests_total", 9),
        ("plinth_serving_inference_errors_total", 2),
        ("plinth_serving_inference_request_duration_seconds_count", 9),
    ):
        assert _value(after, name) - _value(before, name) == grew, name
