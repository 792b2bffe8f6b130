"""Serving's control plane driving the real data plane: the real reconciler, use cases and SLO
guard on a real SQLite store, a real Triton loading real MLflow models (saved locally, so no
MLflow server), and the real HAProxy data plane that serving pushes its routes to; a stock
tritonclient calls the data plane. Rollouts under load lose no request, canary splits land by
weight, and a canary whose predict raises is rolled back by the guard from HAProxy's counters
(its callers get Triton's own error, and Triton stays up).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cloudpickle
import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge

from plinth_common.db import Database
from plinth_common.net import free_tcp_port
from services.serving.app import MIGRATIONS, _route_specs
from services.serving.dataplane import DataPlane, KeyGrant
from services.serving.domain import (
    BatchingSettings,
    DeploymentSpec,
    DeploymentState,
    Promotion,
    Slo,
    Split,
)
from services.serving.reconciler import Reconciler
from services.serving.service import ServingService
from services.serving.store import DeploymentStore
from services.serving.traffic import CanaryGuard, MergedStats
from services.serving.triton import ModelRepository, TritonModels, TritonProcess, TritonSettings
from tests.helpers import ADMIN, eventually
from tests.unit.serving.fakes import FakeEvents, FakeRegistry

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(not DataPlane.available()[0], reason=DataPlane.available()[1]),
    # Triton loads three MLflow pyfunc models in the module's set-up (slow on busy cores).
    pytest.mark.timeout(900),
]
MODEL = "diabetes"
DEPLOYMENT = "diab"
ROWS = load_diabetes(as_frame=True).data.iloc[:4]
_T0 = datetime(2026, 1, 1, tzinfo=UTC)


class AlwaysFails(PythonModel):  # type: ignore[misc]
    """Loads like any version, answers nothing: the injected failing canary."""

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
        raise RuntimeError("injected failure: this version always fails")


def _save_models(root: Path) -> dict[str, Path]:
    """Version -> a saved MLflow model: v1 and v2 ridge regressions, v3 one that fails."""
    data = load_diabetes(as_frame=True)
    saved: dict[str, Path] = {}
    for version, alpha in (("1", 1.0), ("2", 0.1)):
        model = Ridge(alpha=alpha).fit(data.data, data.target)
        signature = infer_signature(data.data.head(), model.predict(data.data.head()))
        saved[version] = root / f"v{version}"
        mlflow.sklearn.save_model(model, saved[version], signature=signature)
    signature = infer_signature(data.data.head(), np.zeros(5))
    saved["3"] = root / "v3"
    # By value: Triton's Python stub cannot import this test module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    mlflow.pyfunc.save_model(saved["3"], python_model=AlwaysFails(), signature=signature)
    return saved


class LocalArtifacts:
    """Sources ``local:<version>`` download as a copy of that version's saved model."""

    def __init__(self, saved: dict[str, Path]) -> None:
        self._saved = saved

    async def download(self, source: str, dst: Path) -> Path:
        await asyncio.to_thread(shutil.copytree, self._saved[source.removeprefix("local:")], dst)
        return dst


class Registry(FakeRegistry):
    """The fake registry, its versions pointing at the saved models."""

    async def version(self, model_name: str, version: str) -> Any:
        ref = await super().version(model_name, version)
        return type(ref)(version=version, source=f"local:{version}", run_id=ref.run_id)


@dataclass
class Stack:
    """The pieces, a key granted on the deployment, and the data plane's address."""

    service: ServingService
    reconciler: Reconciler
    db: Database
    dp: DataPlane
    guard: CanaryGuard
    events: FakeEvents
    expected: dict[str, np.ndarray[Any, Any]]
    stats: MergedStats
    models: TritonModels
    headers: dict[str, str] = field(default_factory=dict)

    async def wait_direct(self, version: str) -> None:
        """Waits until ``version`` answers as the deployment's own Triton model (no rewrite)."""

        async def direct() -> bool:
            return self.reconciler.routed_models() == {f"{DEPLOYMENT}/{version}": DEPLOYMENT}

        await eventually(direct, timeout=60, interval=0.1)

    async def promote(self, version: str, minute: int) -> None:
        promotion = Promotion(
            model_name=MODEL,
            alias="production",
            version=version,
            source=f"local:{version}",
            run_id="r",
            time=_T0 + timedelta(minutes=minute),
        )
        async with self.db.transaction() as session:
            await self.service.on_promoted(session, promotion)

    async def wait_serving(self, version: str) -> None:
        async def serving() -> bool:
            d = await self.service.get(ADMIN, DEPLOYMENT)
            return d.serving_version == version and d.state is DeploymentState.READY

        await eventually(serving, timeout=120, interval=0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("serving-dp")
    saved = await asyncio.to_thread(_save_models, root / "saved")
    expected = {
        v: np.asarray(mlflow.pyfunc.load_model(str(saved[v])).predict(ROWS)).reshape(-1)
        for v in ("1", "2")
    }
    grpc_port = free_tcp_port()
    while (http_port := free_tcp_port()) == grpc_port:
        pass
    (root / "models").mkdir()
    triton = TritonProcess(
        TritonSettings(
            model_repository=root / "models",
            work_dir=root / "work",
            grpc_port=grpc_port,
            http_port=http_port,
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
        # as the app wires it: an old version goes once the data plane drained it (at most 10 s)
        unload_grace_s=10.0,
        reconcile_interval_s=0.5,
        publisher=publish,
        direct=repository,  # as the app wires it with a data plane
        in_flight=dp.in_flight,
    )
    # As the app wires it: the data plane's counters and Triton's own, merged.
    stats = MergedStats(proxy=dp, engine=models, models=reconciler.routed_models)
    guard = CanaryGuard(stats=stats, canaries=reconciler, interval_s=0.5)
    service = ServingService(
        db=db,
        store=store,
        events=events,
        registry=registry,
        reconciler=reconciler,
        meter=guard,
        traffic_wait_s=180,
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
    await triton.start()
    try:
        await triton.wait_ready()
        await dp.start()
        await dp.apply_grants([grant])
        await reconciler.start()
        await guard.start()
        await service.create(
            ADMIN,
            DeploymentSpec(
                name=DEPLOYMENT,
                team="ml",
                model_name=MODEL,
                batching=BatchingSettings(
                    max_batch_size=16, max_queue_delay_us=500, instance_count=0
                ),
                slo=Slo(max_error_rate_pct=1.0, max_p99_ms=2000.0, window_s=30),
            ),
        )
        held = Stack(service, reconciler, db, dp, guard, events, expected, stats, models)
        held.headers = {"authorization": f"Bearer plk_{key_id}_{secret}"}
        await held.promote("1", minute=0)
        await held.wait_serving("1")
        yield held
    finally:
        await guard.stop()
        await reconciler.stop()
        await models.close()
        await dp.stop()
        await triton.stop()
        await db.close()


def _tensor(module: Any) -> Any:
    tensor = module.InferInput("input", list(ROWS.shape), "FP64")
    tensor.set_data_from_numpy(ROWS.to_numpy(dtype=np.float64))
    return tensor


@dataclass
class Load:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    versions: Counter[str] = field(default_factory=Counter)


async def _run_load(stack: Stack, stop: asyncio.Event, load: Load, callers: int = 4) -> None:
    async def caller() -> None:
        client = triton_aio.InferenceServerClient(stack.dp.grpc_address)
        tensor = _tensor(triton_aio)
        try:
            while not stop.is_set():
                try:
                    result = await client.infer(
                        DEPLOYMENT, [tensor], headers=stack.headers, client_timeout=30
                    )
                except Exception as exc:  # noqa: BLE001 - counted; the test says which
                    load.failed.append(str(exc)[:200])
                    await asyncio.sleep(0.005)
                    continue
                load.ok += 1
                load.versions[result.get_response().model_version] += 1
        finally:
            await client.close()

    await asyncio.gather(*(caller() for _ in range(callers)))


async def test_the_pushed_route_answers_a_stock_client_with_mlflows_predictions(
    stack: Stack,
) -> None:
    client = triton_grpc.InferenceServerClient(stack.dp.grpc_address)
    result = await asyncio.to_thread(
        client.infer, DEPLOYMENT, [_tensor(triton_grpc)], headers=stack.headers
    )
    assert np.allclose(result.as_numpy("predictions").reshape(-1), stack.expected["1"])
    assert result.get_response().model_name == DEPLOYMENT


async def test_a_rollout_under_load_loses_no_request(stack: Stack) -> None:
    """From v1 as the direct model, through diab__v2, to v2 as the direct model."""
    await stack.wait_direct("1")
    stop, load = asyncio.Event(), Load()
    running = asyncio.create_task(_run_load(stack, stop, load))
    try:
        await asyncio.sleep(1.0)
        await stack.promote("2", minute=1)
        await stack.wait_serving("2")
        await stack.wait_direct("2")
        # diab__v2 goes once the data plane has no request in flight on it, long before the grace
        await asyncio.sleep(2.0)
        v2_loaded = await stack.models.is_ready("diab__v2")
        await asyncio.sleep(0.5)  # load on the direct v2 alone
    finally:
        stop.set()
        await running
    assert load.failed == [], load.failed[:3]
    assert not v2_loaded, "diab__v2 was still loaded 2 s after the direct hop (drain waited)"
    assert load.versions["1"] > 0 and load.versions["2"] > 0, load.versions
    print(f"rollout under load: {load.ok} requests, 0 failed, by version {dict(load.versions)}")
    client = triton_grpc.InferenceServerClient(stack.dp.grpc_address)
    result = await asyncio.to_thread(
        client.infer, DEPLOYMENT, [_tensor(triton_grpc)], headers=stack.headers
    )
    assert np.allclose(result.as_numpy("predictions").reshape(-1), stack.expected["2"])


async def test_a_90_10_split_lands_by_weight_and_get_shows_the_measurements(
    stack: Stack,
) -> None:
    stable = (await stack.service.get(ADMIN, DEPLOYMENT)).serving_version
    canary = "1" if stable == "2" else "2"
    await stack.service.set_traffic(ADMIN, DEPLOYMENT, [(canary, 10), (stable, 90)])
    client = triton_grpc.InferenceServerClient(stack.dp.grpc_address)
    tensor = _tensor(triton_grpc)

    def calls(n: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        for _ in range(n):
            result = client.infer(DEPLOYMENT, [tensor], headers=stack.headers)
            seen[result.get_response().model_version] += 1
        return seen

    seen = await asyncio.to_thread(calls, 1000)
    assert 0.07 < seen[canary] / 1000 < 0.13, seen
    await asyncio.sleep(1.2)  # the guard reads the counters twice a second
    shown = await stack.service.get(ADMIN, DEPLOYMENT)
    measured = stack.service.measured(shown)
    view = measured[canary]
    assert view is not None and view.requests > 0 and view.error_rate_pct == 0.0
    assert shown.traffic == {stable: 90, canary: 10}, "a healthy canary stays"
    await stack.service.set_traffic(ADMIN, DEPLOYMENT, [(stable, 100)])


async def test_a_failing_canary_is_rolled_back_by_the_guard(stack: Stack) -> None:
    stable = (await stack.service.get(ADMIN, DEPLOYMENT)).serving_version
    shown = await stack.service.set_traffic(
        ADMIN, DEPLOYMENT, [("3", 20), (stable, 80)], reason="inject a failing canary"
    )
    assert shown.traffic == {stable: 80, "3": 20}
    stop, load = asyncio.Event(), Load()
    began = asyncio.get_running_loop().time()
    running = asyncio.create_task(_run_load(stack, stop, load))

    async def rolled_back() -> bool:
        return (await stack.service.get(ADMIN, DEPLOYMENT)).traffic == {stable: 100}

    try:
        try:
            await eventually(rolled_back, timeout=60, interval=0.2)
        except AssertionError:
            counters = await stack.dp.stats()
            merged = await stack.stats.stats()
            engine = await stack.models.statistics("diab__v3")
            raise AssertionError(
                f"not rolled back; merged {merged}; triton v3 {engine}; guard rollbacks "
                f"{stack.guard.rollbacks}; canaried {stack.reconciler.canaried()}; "
                f"data plane counters {counters}; callers saw {load.ok} answers, "
                f"{len(load.failed)} failures {load.failed[:2]}"
            ) from None
        took = asyncio.get_running_loop().time() - began
        failed_before = len(load.failed)
        await asyncio.sleep(1.5)  # after the rollback (and the drain) nothing fails any more
    finally:
        stop.set()
        await running
    assert failed_before > 0
    assert len(load.failed) == failed_before, load.failed[failed_before:][:3]
    # Triton's own answer for a model that raises, unchanged (no garbled message, no reset
    # stream: Triton stayed up, as the stable version's answers after the rollback show)
    own = "[StatusCode.INTERNAL] prediction failed: RuntimeError: injected failure: this version"
    assert all(failure.startswith(own) for failure in load.failed), set(load.failed)
    change = stack.events.changes[-1]
    assert change.previous == {stable: 80, "3": 20} and change.traffic == {stable: 100}
    assert change.reason.startswith("rollback: canary v3 error rate"), change.reason
    assert change.actor == "serving"
    print(f"failing canary rolled back {took:.1f}s after load began: {change.reason}")
