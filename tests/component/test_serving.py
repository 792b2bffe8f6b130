"""The serving service as a real gRPC server, with a real nats-server, a real ``mlflow server``
and a real Triton (one of each for the module), and a small fake registry."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as triton_sync
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.grpc import service_pb2_grpc as kserve_grpc
from tritonclient.utils import InferenceServerException

from plinth.events.v1 import events_pb2
from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth.serving.v1 import serving_pb2 as pb
from plinth.serving.v1 import serving_pb2_grpc
from plinth_common.auth import Principal, Role, ServiceAuthInterceptor, current_principal
from plinth_common.events import CloudEvent, new_event
from plinth_common.nats_server import NatsServer
from plinth_common.net import free_tcp_port
from services.registry.mlflow_engine import MlflowServer, MlflowSettings
from services.serving.app import ServingApp, ServingSettings
from services.serving.triton import TritonProcess, TritonSettings
from tests.helpers import (
    ADMIN,
    TEST_TOKENS,
    EventRecorder,
    TritonIdentity,
    channel_as,
    eventually,
    member,
    service_env,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "diabetes"
_MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
READY, FAILED, TRAFFIC = (
    "plinth.deployment.ready",
    "plinth.deployment.failed",
    "plinth.deployment.traffic_changed",
)


# -- engines shared by the module ------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(
        MlflowSettings(
            backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
            artifacts_destination=str(root / "artifacts"),
            port=free_tcp_port(),
        ),
        log_path=root / "mlflow-server.log",
    )
    await server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        await server.stop()


@dataclass
class Triton:
    """The module's Triton, which serving reaches by URL (as it would a Triton fleet)."""

    process: TritonProcess
    repository: Path

    @property
    def grpc_target(self) -> str:
        return self.process.grpc_target


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Triton]:
    root = tmp_path_factory.mktemp("triton")
    grpc_port = free_tcp_port()
    http_port = free_tcp_port()
    while http_port == grpc_port:
        http_port = free_tcp_port()
    process = TritonProcess(
        TritonSettings(
            model_repository=root / "models",
            work_dir=root / "work",
            grpc_port=grpc_port,
            http_port=http_port,
        )
    )
    await process.start()
    try:
        await process.wait_ready()
        yield Triton(process=process, repository=root / "models")
    finally:
        await process.stop()


@dataclass
class Versions:
    """Model versions logged to MLflow: number -> source URI, plus the evaluation rows."""

    sources: dict[str, str]
    rows: Any  # pandas DataFrame of diabetes features
    artifacts_root: Path


def _log_versions(tracking_uri: str, artifacts_root: Path) -> Versions:
    """Registers three versions of a Ridge regressor; the third one's artifacts are broken."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.sklearn
    import sklearn
    from mlflow import MlflowClient
    from mlflow.models import infer_signature
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    from plinth_common.mlflow_client import skip_feast_mlflow_header_provider

    skip_feast_mlflow_header_provider()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("serving-test")
    features, target = load_diabetes(return_X_y=True, as_frame=True)
    sources = {}
    for alpha in (1.0, 0.05, 0.5):
        estimator = Ridge(alpha=alpha).fit(features, target)
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(
                estimator,
                name="model",
                signature=infer_signature(features, estimator.predict(features)),
                pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
                registered_model_name=MODEL,
            )
        version = MlflowClient().get_model_version(MODEL, str(info.registered_model_version))
        sources[str(version.version)] = str(version.source)
    # Version 3's artifacts get corrupted on the server's disk: downloading works, loading fails.
    broken = next(
        artifacts_root.rglob(f"{sources['3'].removeprefix('models:/')}/artifacts/model.skops")
    )
    broken.write_bytes(b"this is not a model")
    return Versions(sources=sources, rows=features.iloc[:16], artifacts_root=artifacts_root)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def versions(mlflow_server: MlflowServer) -> Versions:
    return await asyncio.to_thread(
        _log_versions,
        mlflow_server.tracking_uri,
        Path(mlflow_server.settings.artifacts_destination),
    )


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """Implements just GetModelVersionByAlias and SearchModels, from a dict and a set (models of
    team ``ml``), behind the real auth interceptor; records who called."""

    def __init__(self) -> None:
        self.aliases: dict[tuple[str, str], registry_pb2.ModelVersion] = {}
        self.models = {MODEL, "wine-quality", "iris"}
        self.teams = {"iris": "other"}  # every other model is team ml's
        self.calls = 0
        self.callers: set[Principal] = set()

    async def SearchModels(
        self, request: registry_pb2.SearchModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SearchModelsResponse:
        self.callers.add(current_principal())
        return registry_pb2.SearchModelsResponse(
            models=[
                registry_pb2.RegisteredModel(name=name, team=self.teams.get(name, "ml"))
                for name in sorted(self.models)
                if name.startswith(request.name_prefix)
            ]
        )

    async def GetModelVersionByAlias(
        self, request: registry_pb2.GetModelVersionByAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ModelVersion:
        self.callers.add(current_principal())
        self.calls += 1
        version = self.aliases.get((request.name, request.alias))
        if version is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {request.name!r} has no alias {request.alias!r}"
            )
        return version


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def registry() -> AsyncIterator[tuple[FakeRegistry, str]]:
    fake = FakeRegistry()
    server = grpc.aio.server(interceptors=[ServiceAuthInterceptor(TEST_TOKENS)])
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(0)


@dataclass
class Serving:
    """A running serving app, clients of it, and what the tests publish."""

    app: ServingApp
    settings: ServingSettings
    nats_url: str
    channel: grpc.aio.Channel = field(init=False)
    stub: serving_pb2_grpc.ServingServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = channel_as(self.address)
        self.stub = serving_pb2_grpc.ServingServiceStub(self.channel)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    async def create(self, name: str, *, alias: str = "production", **triton: int) -> pb.Deployment:
        settings = pb.TritonSettings(**({"max_batch_size": 8} | triton))
        request = pb.CreateDeploymentRequest(
            name=name, team="ml", model_name=MODEL, alias=alias, triton=settings
        )
        return await self.stub.CreateDeployment(request)

    async def promote(
        self, version: str, source: str, *, alias: str = "production", model: str = MODEL
    ) -> None:
        """Publishes plinth.model.promoted the way the registry does (a CloudEvent on JetStream)."""
        payload = events_pb2.ModelPromoted(
            model_name=model, alias=alias, version=version, team="ml", source=source, run_id="r"
        )
        event = new_event(payload, source="/plinth/registry", subject=model, team="ml")
        nc = await nats.connect(self.nats_url)
        try:
            await nc.jetstream().publish(event.type, event.data, headers=event.headers())
        finally:
            await nc.close()

    async def wait(self, name: str, predicate: Any, timeout: float = 120) -> pb.Deployment:
        async def probe() -> pb.Deployment | None:
            deployment = await self.stub.GetDeployment(pb.GetDeploymentRequest(name=name))
            return deployment if predicate(deployment) else None

        return await eventually(probe, timeout=timeout, interval=0.2)

    async def close(self) -> None:
        await self.channel.close()
        await self.app.stop()


async def _start_serving(
    data_dir: Path, nats_url: str, triton: Triton, mlflow_uri: str, registry_addr: str
) -> Serving:
    env = service_env(
        data_dir,
        nats_url,
        PLINTH_TRITON_URL=triton.grpc_target,
        PLINTH_TRITON_MODEL_REPOSITORY=str(triton.repository),
        PLINTH_MLFLOW_TRACKING_URI=mlflow_uri,
        PLINTH_REGISTRY_ADDR=registry_addr,
        PLINTH_SERVING_UNLOAD_GRACE_S="0.1",
    )
    settings = ServingSettings.from_env(env)
    app = ServingApp(settings)
    await app.start()
    await asyncio.wait_for(app.reconciler.wait_started(), 60)
    return Serving(app=app, settings=settings, nats_url=nats_url)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def serving(
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    triton: Triton,
    mlflow_server: MlflowServer,
    versions: Versions,
    registry: tuple[FakeRegistry, str],
) -> AsyncIterator[Serving]:
    # In-process serving puts its MLflow credentials into this process's environment, as it
    # does in its own process; they must not outlive the module.
    saved = {name: os.environ.get(name) for name in _MLFLOW_CREDENTIALS}
    holder = await _start_serving(
        tmp_path_factory.mktemp("serving"),
        nats_server.url,
        triton,
        mlflow_server.tracking_uri,
        registry[1],
    )
    try:
        yield holder
    finally:
        await holder.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest_asyncio.fixture(loop_scope="session")
async def events(nats_server: NatsServer) -> AsyncIterator[EventRecorder]:
    async with EventRecorder(nats_server.url) as recorder:
        yield recorder


def _events_of(recorder: EventRecorder, deployment: str, event_type: str) -> list[Any]:
    return [
        CloudEvent.from_headers(m.headers, m.data).payload()
        for m in recorder.messages
        if m.subject == event_type and (m.headers or {}).get("ce-subject") == deployment
    ]


def _client(serving: Serving, principal: Principal = ADMIN) -> triton_sync.InferenceServerClient:
    """A stock, synchronous KServe v2 client pointed at the serving service's port, whose calls
    carry ``principal`` as the gateway forwards it."""
    client = triton_sync.InferenceServerClient(serving.address)
    client.register_plugin(TritonIdentity(principal))
    return client


def _infer(
    client: triton_sync.InferenceServerClient,
    deployment: str,
    rows: np.ndarray,
    *,
    name: str = "input",
    datatype: str = "FP64",
) -> np.ndarray:
    tensor = triton_sync.InferInput(name, list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)
    result = client.infer(
        deployment,
        [tensor],
        outputs=[triton_sync.InferRequestedOutput("predictions")],
        client_timeout=30,
    )
    out = result.as_numpy("predictions")
    assert out is not None
    return out


def _mlflow_predictions(source: str, tracking_uri: str, rows: Any) -> np.ndarray:
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri)
    return np.asarray(mlflow.pyfunc.load_model(source).predict(rows))


# -- the tests, in the order a deployment lives ----------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"name": "../etc"}, "name"),
        ({"name": "Bad_Name"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"team": "../../tmp"}, "team"),
        ({"model_name": "../../etc/passwd"}, "model_name"),
        ({"model_name": "a/b"}, "model_name"),
        ({"alias": "../x"}, "alias"),
        ({"triton": pb.TritonSettings(max_batch_size=-1)}, "triton.max_batch_size"),
        (
            {"triton": pb.TritonSettings(max_queue_delay_microseconds=-5)},
            "triton.max_queue_delay_microseconds",
        ),
        ({"triton": pb.TritonSettings(instance_count=99)}, "triton.instance_count"),
    ],
)
async def test_invalid_deployment_is_refused_naming_the_field(
    serving: Serving, fields: dict[str, Any], field_name: str
) -> None:
    request = pb.CreateDeploymentRequest(
        **({"name": "ok", "team": "ml", "model_name": MODEL} | fields)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.stub.CreateDeployment(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field_name), caught.value.details()


async def test_alias_latest_is_refused_naming_the_field(serving: Serving) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.create("follows-latest", alias="latest")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("alias:") and "reserved" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.stub.GetDeployment(pb.GetDeploymentRequest(name="follows-latest"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was created


async def test_unknown_model_is_not_found_with_the_closest_names(serving: Serving) -> None:
    request = pb.CreateDeploymentRequest(name="diab2", team="ml", model_name="diabetis")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.stub.CreateDeployment(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'diabetis'" in caught.value.details()
    assert "did you mean 'diabetes'?" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.stub.GetDeployment(pb.GetDeploymentRequest(name="diab2"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was created


async def test_crud_pending_until_promotion(
    serving: Serving, registry: tuple[FakeRegistry, str]
) -> None:
    fake, _ = registry
    calls = fake.calls
    created = await serving.create(
        "crud-a", alias="staging", max_queue_delay_microseconds=200, instance_count=1
    )
    assert (
        created.state == pb.DEPLOYMENT_STATE_PENDING and not created.serving_version
    )  # alias points nowhere
    assert (
        created.alias == "staging"
        and created.triton.max_batch_size == 8
        and created.triton.max_queue_delay_microseconds == 200
    )
    assert fake.calls > calls  # the registry was asked
    defaults = await serving.stub.CreateDeployment(
        pb.CreateDeploymentRequest(name="crud-b", team="other", model_name="iris")
    )
    assert (
        defaults.alias == "production"
        and defaults.triton.max_batch_size == 8
        and defaults.triton.instance_count == 1
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.create("crud-a")
    assert (
        caught.value.code() == grpc.StatusCode.ALREADY_EXISTS and "crud-a" in caught.value.details()
    )

    assert (
        await serving.stub.GetDeployment(pb.GetDeploymentRequest(name="crud-a"))
    ).model_name == MODEL
    first = await serving.stub.ListDeployments(pb.ListDeploymentsRequest(page_size=1))
    assert len(first.deployments) == 1 and first.next_page_token
    second = await serving.stub.ListDeployments(
        pb.ListDeploymentsRequest(page_size=1, page_token=first.next_page_token)
    )
    assert second.deployments[0].name != first.deployments[0].name
    others = await serving.stub.ListDeployments(pb.ListDeploymentsRequest(team="other"))
    assert [d.name for d in others.deployments] == ["crud-b"]

    for name in ("crud-a", "crud-b"):
        await serving.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name=name))
    for call, request in (
        (serving.stub.GetDeployment, pb.GetDeploymentRequest(name="crud-a")),
        (serving.stub.DeleteDeployment, pb.DeleteDeploymentRequest(name="crud-a")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request)
        assert (
            caught.value.code() == grpc.StatusCode.NOT_FOUND and "crud-a" in caught.value.details()
        )


async def test_promotion_loads_and_serves_the_mlflow_predictions(
    serving: Serving,
    versions: Versions,
    events: EventRecorder,
    triton: Triton,
    mlflow_server: MlflowServer,
) -> None:
    await serving.create("diabetes", max_batch_size=32, max_queue_delay_microseconds=500)
    await serving.promote("1", versions.sources["1"])
    deployment = await serving.wait("diabetes", lambda d: d.state == pb.DEPLOYMENT_STATE_READY)
    assert (
        deployment.serving_version == "1"
        and deployment.target_version == "1"
        and not deployment.loading_version
    )
    await eventually(lambda: _async(_events_of(events, "diabetes", TRAFFIC)))
    assert [e.version for e in _events_of(events, "diabetes", READY)] == ["1"]
    assert dict(_events_of(events, "diabetes", TRAFFIC)[0].traffic_percent) == {"1": 100}

    client = _client(serving)
    try:
        assert await asyncio.to_thread(client.is_server_live)
        assert await asyncio.to_thread(client.is_server_ready)
        assert await asyncio.to_thread(client.is_model_ready, "diabetes")
        metadata = await asyncio.to_thread(client.get_model_metadata, "diabetes", as_json=True)
        assert metadata["name"] == "diabetes" and metadata["versions"] == ["1"]
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP64", "shape": ["-1", "10"]}]
        rows = versions.rows.to_numpy(dtype=np.float64)
        got = await asyncio.to_thread(_infer, client, "diabetes", rows[:5])
        want = await asyncio.to_thread(
            _mlflow_predictions,
            versions.sources["1"],
            mlflow_server.tracking_uri,
            versions.rows.iloc[:5],
        )
        assert got.shape == (5, 1)
        assert np.allclose(got[:, 0], want)
        # Concurrent single rows go through Triton's dynamic batcher and each gets its own answer.
        singles = await asyncio.gather(
            *(asyncio.to_thread(_infer, client, "diabetes", rows[i : i + 1]) for i in range(8))
        )
        assert np.allclose(
            np.concatenate(singles)[:, 0],
            (
                await asyncio.to_thread(
                    _mlflow_predictions,
                    versions.sources["1"],
                    mlflow_server.tracking_uri,
                    versions.rows.iloc[:8],
                )
            ),
        )
    finally:
        client.close()


async def _async(value: Any) -> Any:
    return value


async def test_second_version_takes_the_traffic_and_the_old_one_is_unloaded(
    serving: Serving,
    versions: Versions,
    events: EventRecorder,
    triton: Triton,
    mlflow_server: MlflowServer,
) -> None:
    await serving.promote("2", versions.sources["2"])
    deployment = await serving.wait("diabetes", lambda d: d.serving_version == "2")
    assert deployment.state == pb.DEPLOYMENT_STATE_READY
    await eventually(
        lambda: _async(
            [
                e
                for e in _events_of(events, "diabetes", TRAFFIC)
                if dict(e.traffic_percent) == {"2": 100}
            ]
        )
    )
    repository = triton.repository
    direct = triton_aio.InferenceServerClient(triton.grpc_target)
    try:

        async def old_unloaded() -> bool:
            return (
                not await direct.is_model_ready("diabetes__v1")
                and not (repository / "diabetes__v1").exists()
            )

        await eventually(old_unloaded)
        assert await direct.is_model_ready("diabetes__v2")
    finally:
        await direct.close()
    client = _client(serving)
    try:
        got = await asyncio.to_thread(
            _infer, client, "diabetes", versions.rows.to_numpy(dtype=np.float64)
        )
        result = await asyncio.to_thread(
            lambda: client.get_model_metadata("diabetes", as_json=True)
        )
        assert result["versions"] == ["2"]
    finally:
        client.close()
    want2 = await asyncio.to_thread(
        _mlflow_predictions, versions.sources["2"], mlflow_server.tracking_uri, versions.rows
    )
    want1 = await asyncio.to_thread(
        _mlflow_predictions, versions.sources["1"], mlflow_server.tracking_uri, versions.rows
    )
    assert np.allclose(got[:, 0], want2) and not np.allclose(want1, want2)


async def test_broken_version_fails_and_the_previous_one_keeps_serving(
    serving: Serving, versions: Versions, events: EventRecorder
) -> None:
    await serving.promote("3", versions.sources["3"])
    deployment = await serving.wait("diabetes", lambda d: d.state == pb.DEPLOYMENT_STATE_FAILED)
    assert (
        deployment.serving_version == "2"
        and deployment.target_version == "3"
        and "v3" in deployment.last_error
    )
    failed = await eventually(lambda: _async(_events_of(events, "diabetes", FAILED)))
    assert failed[-1].version == "3" and failed[-1].serving_version == "2" and failed[-1].reason
    client = _client(serving)
    try:
        assert (
            await asyncio.to_thread(
                _infer, client, "diabetes", versions.rows.to_numpy(dtype=np.float64)[:2]
            )
        ).shape == (2, 1)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("kwargs", "rows_shape", "tensor", "problem"),
    [
        ({"name": "features"}, (2, 10), "features", "unknown input tensor"),
        ({}, (2, 9), "input", "shape"),
        ({"datatype": "FP32"}, (2, 10), "input", "datatype"),
        ({}, (33, 10), "input", "batch size"),
    ],
)
async def test_wrong_tensors_are_invalid_argument_naming_the_tensor(
    serving: Serving, kwargs: dict[str, str], rows_shape: tuple[int, int], tensor: str, problem: str
) -> None:
    client = _client(serving)
    dtype = np.float32 if kwargs.get("datatype") == "FP32" else np.float64
    try:
        with pytest.raises(InferenceServerException) as caught:
            await asyncio.to_thread(
                _infer, client, "diabetes", np.zeros(rows_shape, dtype=dtype), **kwargs
            )
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
        assert f"inputs.{tensor}" in caught.value.message() and problem in caught.value.message()
        assert "__v" not in caught.value.message()
        # The deployment keeps serving.
        assert (await asyncio.to_thread(_infer, client, "diabetes", np.zeros((1, 10)))).shape == (
            1,
            1,
        )
    finally:
        client.close()


async def test_unknown_deployment_is_not_found(serving: Serving) -> None:
    client = _client(serving)
    try:
        for name in ("no-such-deployment", "../diabetes__v2", "diabetes__v2"):
            with pytest.raises(InferenceServerException) as caught:
                await asyncio.to_thread(_infer, client, name, np.zeros((1, 10)))
            assert (
                caught.value.status() == "StatusCode.NOT_FOUND" and name in caught.value.message()
            )
        with pytest.raises(InferenceServerException) as caught:
            await asyncio.to_thread(client.is_model_ready, "no-such-deployment")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        # Triton's repository API is not reachable through serving.
        with pytest.raises(InferenceServerException) as caught:
            await asyncio.to_thread(client.get_model_repository_index)
        assert caught.value.status() == "StatusCode.UNIMPLEMENTED"
        with pytest.raises(InferenceServerException) as caught:
            await asyncio.to_thread(client.load_model, "diabetes__v1")
        assert caught.value.status() == "StatusCode.UNIMPLEMENTED"
    finally:
        client.close()


async def test_hostile_promotions_stay_inside_the_service(
    serving: Serving, events: EventRecorder, tmp_path: Path, triton: Triton
) -> None:
    await serving.create("hostile", alias="hostile")
    outside = tmp_path / "outside"
    outside.mkdir()
    for version, source in (
        ("../../../tmp", "models:/m-x"),
        ("7", f"file://{outside}"),
        ("8", str(outside)),
        ("9", "runs:/abc/../../../etc"),
    ):
        await serving.promote(version, source, alias="hostile")
        await serving.wait(
            "hostile",
            lambda d, v=version: d.target_version == v and d.state == pb.DEPLOYMENT_STATE_FAILED,
        )
    reasons = [e.reason for e in _events_of(events, "hostile", FAILED)]
    assert len(reasons) == 4, reasons
    assert (
        "positive integer" in reasons[0]
        and "scheme 'file'" in reasons[1]
        and "scheme '(none)'" in reasons[2]
        and ".." in reasons[3]
    )
    assert list(outside.iterdir()) == []
    repository = triton.repository
    assert not [p for p in repository.parent.iterdir() if p.name not in ("models", "work")]
    assert not [p for p in repository.iterdir() if p.name.startswith("hostile")]
    await serving.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="hostile"))


async def test_create_loads_the_version_the_alias_already_points_to(
    serving: Serving, registry: tuple[FakeRegistry, str], versions: Versions
) -> None:
    fake, _ = registry
    fake.aliases[(MODEL, "champion")] = registry_pb2.ModelVersion(
        name=MODEL, version="1", source=versions.sources["1"], run_id="r1"
    )
    created = await serving.create("champion", alias="champion")
    assert created.state == pb.DEPLOYMENT_STATE_LOADING and created.target_version == "1"
    await serving.wait(
        "champion", lambda d: d.state == pb.DEPLOYMENT_STATE_READY and d.serving_version == "1"
    )
    client = _client(serving)
    try:
        assert (await asyncio.to_thread(_infer, client, "champion", np.zeros((3, 10)))).shape == (
            3,
            1,
        )
    finally:
        client.close()


async def test_promotions_during_a_load_end_with_the_newest(
    serving: Serving, versions: Versions, events: EventRecorder
) -> None:
    await serving.create("racer", alias="canary")
    await serving.promote("1", versions.sources["1"], alias="canary")
    await serving.wait(
        "racer",
        lambda d: d.state == pb.DEPLOYMENT_STATE_LOADING and d.loading_version == "1",
        timeout=30,
    )
    await serving.promote("2", versions.sources["2"], alias="canary")
    deployment = await serving.wait("racer", lambda d: d.state == pb.DEPLOYMENT_STATE_READY)
    assert deployment.serving_version == "2" and deployment.target_version == "2"
    await eventually(lambda: _async(_events_of(events, "racer", TRAFFIC)))
    # v1 finished loading after v2 was promoted: it was dropped, never given traffic.
    assert [dict(e.traffic_percent) for e in _events_of(events, "racer", TRAFFIC)] == [{"2": 100}]


async def test_restart_restores_what_served(
    serving: Serving,
    tmp_path_factory: pytest.TempPathFactory,
    triton: Triton,
    mlflow_server: MlflowServer,
    registry: tuple[FakeRegistry, str],
) -> None:
    data_dir = serving.settings.common.data_dir
    await serving.close()
    restarted = await _start_serving(
        data_dir, serving.nats_url, triton, mlflow_server.tracking_uri, registry[1]
    )
    serving.app, serving.settings = restarted.app, restarted.settings
    serving.__post_init__()
    deployment = await serving.stub.GetDeployment(pb.GetDeploymentRequest(name="diabetes"))
    assert deployment.serving_version == "2" and deployment.state == pb.DEPLOYMENT_STATE_FAILED
    client = _client(serving)
    try:
        assert (await asyncio.to_thread(_infer, client, "diabetes", np.zeros((1, 10)))).shape == (
            1,
            1,
        )
    finally:
        client.close()


async def test_delete_unloads_from_triton(
    serving: Serving, triton: Triton, events: EventRecorder
) -> None:
    await serving.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="diabetes"))
    direct = triton_aio.InferenceServerClient(triton.grpc_target)
    try:
        assert not await direct.is_model_ready("diabetes__v2")
    finally:
        await direct.close()
    assert not (triton.repository / "diabetes__v2").exists()
    client = _client(serving)
    try:
        with pytest.raises(InferenceServerException) as caught:
            await asyncio.to_thread(_infer, client, "diabetes", np.zeros((1, 10)))
        assert caught.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()
    await eventually(
        lambda: _async(
            [e for e in _events_of(events, "diabetes", TRAFFIC) if not e.traffic_percent]
        )
    )


# -- access: two teams, each role, a shared deployment ------------------------------------------

ML_VIEWER, ML_DEV, ML_MAINTAINER = (
    member("vic", ml=Role.VIEWER),
    member("dev", ml=Role.DEVELOPER),
    member("mia", ml=Role.MAINTAINER),
)
VISION_VIEWER = member("val", vision=Role.VIEWER)  # "acl" is shared with vision
OUTSIDER = member("oz", nlp=Role.MAINTAINER)
OK = grpc.StatusCode.OK
NOT_FOUND, DENIED = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


def _acl_infer_request() -> kserve.ModelInferRequest:
    request = kserve.ModelInferRequest(model_name="acl")
    tensor = request.inputs.add(name="input", datatype="FP64", shape=[1, 10])
    tensor.contents.fp64_contents.extend([0.0] * 10)
    return request


async def _inference_codes(
    address: str, principal: Principal | None, name: str = "acl"
) -> dict[str, grpc.StatusCode]:
    """The status of each KServe v2 method on ``name``, called as ``principal`` (None: no
    forwarded identity at all)."""
    channel = (
        grpc.aio.insecure_channel(address) if principal is None else channel_as(address, principal)
    )
    async with channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        infer = _acl_infer_request()
        infer.model_name = name
        return {
            "ModelInfer": await _code(stub.ModelInfer(infer, timeout=30)),
            "ModelReady": await _code(stub.ModelReady(kserve.ModelReadyRequest(name=name))),
            "ModelMetadata": await _code(
                stub.ModelMetadata(kserve.ModelMetadataRequest(name=name))
            ),
            "ServerLive": await _code(stub.ServerLive(kserve.ServerLiveRequest())),
            "ServerReady": await _code(stub.ServerReady(kserve.ServerReadyRequest())),
        }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def acl(
    serving: Serving, registry: tuple[FakeRegistry, str], versions: Versions
) -> AsyncIterator[str]:
    """Deployment "acl" of team ml, READY, shared with team vision."""
    fake, _ = registry
    fake.aliases[(MODEL, "acl")] = registry_pb2.ModelVersion(
        name=MODEL, version="1", source=versions.sources["1"], run_id="r1"
    )
    async with channel_as(serving.address, ML_DEV) as channel:
        created = await serving_pb2_grpc.ServingServiceStub(channel).CreateDeployment(
            pb.CreateDeploymentRequest(
                name="acl", team="ml", model_name=MODEL, alias="acl", shared_with=["vision"]
            )
        )
    assert list(created.shared_with) == ["vision"]
    await serving.wait("acl", lambda d: d.state == pb.DEPLOYMENT_STATE_READY)
    yield "acl"


async def test_inference_access_matrix(serving: Serving, acl: str) -> None:
    """Members of the owning team and of the shared team infer; anyone else gets the NOT_FOUND
    of a deployment that does not exist, word for word; no identity is UNAUTHENTICATED."""
    everything_ok = dict.fromkeys(
        ("ModelInfer", "ModelReady", "ModelMetadata", "ServerLive", "ServerReady"), OK
    )
    for caller in (ML_VIEWER, ML_DEV, ML_MAINTAINER, VISION_VIEWER, ADMIN):
        assert await _inference_codes(serving.address, caller) == everything_ok, caller.name
    outsider = await _inference_codes(serving.address, OUTSIDER)
    assert outsider == everything_ok | {
        "ModelInfer": NOT_FOUND, "ModelReady": NOT_FOUND, "ModelMetadata": NOT_FOUND
    }  # fmt: skip
    unknown = await _inference_codes(serving.address, ADMIN, name="no-such")
    assert {k: v for k, v in unknown.items() if v != OK} == {
        k: v for k, v in outsider.items() if v != OK
    }
    async with channel_as(serving.address, OUTSIDER) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await stub.ModelInfer(_acl_infer_request())
    async with channel_as(serving.address, ADMIN) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        absent = _acl_infer_request()
        absent.model_name = "acl2"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.ModelInfer(absent)
    assert hidden.value.details() == missing.value.details().replace("acl2", "acl")
    # A direct call without the gateway's identity is refused, for every method.
    bare = await _inference_codes(serving.address, None)
    assert set(bare.values()) == {grpc.StatusCode.UNAUTHENTICATED}
    # A stock tritonclient carrying the shared team's identity gets predictions.
    client = _client(serving, VISION_VIEWER)
    try:
        assert (await asyncio.to_thread(_infer, client, acl, np.zeros((2, 10)))).shape == (2, 1)
    finally:
        client.close()


async def test_deployment_rpc_access_matrix(serving: Serving, acl: str) -> None:
    """Each ServingService RPC, each role of the owning team, the shared team, an outsider."""

    admin = serving.stub

    async def codes(principal: Principal | None) -> dict[str, grpc.StatusCode]:
        who = principal.name if principal else "anon"
        # What this caller tries to delete: a deployment of team ml shared with vision.
        victim = pb.CreateDeploymentRequest(
            name=f"victim-{who}",
            team="ml",
            model_name="wine-quality",
            alias="none-yet",
            shared_with=["vision"],
        )
        await admin.CreateDeployment(victim)
        channel = (
            grpc.aio.insecure_channel(serving.address)
            if principal is None
            else channel_as(serving.address, principal)
        )
        async with channel:
            stub = serving_pb2_grpc.ServingServiceStub(channel)
            create = pb.CreateDeploymentRequest(
                name=f"new-{who}", team="ml", model_name="wine-quality", alias="none-yet"
            )
            result = {
                "Create": await _code(stub.CreateDeployment(create)),
                "Get": await _code(stub.GetDeployment(pb.GetDeploymentRequest(name=acl))),
                "ListTeam": await _code(stub.ListDeployments(pb.ListDeploymentsRequest(team="ml"))),
                # Sharing with the same team again changes nothing, whoever may do it.
                "Share": await _code(
                    stub.ShareDeployment(pb.ShareDeploymentRequest(name=acl, teams=["vision"]))
                ),
                "Delete": await _code(
                    stub.DeleteDeployment(pb.DeleteDeploymentRequest(name=victim.name))
                ),
            }
        for leftover in (create.name, victim.name):
            await _code(admin.DeleteDeployment(pb.DeleteDeploymentRequest(name=leftover)))
        return result

    expected = {
        # Viewers read, developers create, maintainers share and delete.
        ML_VIEWER: {"Create": DENIED, "Get": OK, "ListTeam": OK, "Share": DENIED, "Delete": DENIED},
        ML_DEV: {"Create": OK, "Get": OK, "ListTeam": OK, "Share": DENIED, "Delete": DENIED},
        ML_MAINTAINER: {"Create": OK, "Get": OK, "ListTeam": OK, "Share": OK, "Delete": OK},
        # A share lends inference only: the shared team sees nothing else.
        VISION_VIEWER: dict.fromkeys(("Create", "Get", "ListTeam", "Share", "Delete"), NOT_FOUND),
        OUTSIDER: dict.fromkeys(("Create", "Get", "ListTeam", "Share", "Delete"), NOT_FOUND),
        None: dict.fromkeys(
            ("Create", "Get", "ListTeam", "Share", "Delete"), grpc.StatusCode.UNAUTHENTICATED
        ),
    }  # fmt: skip
    for principal, want in expected.items():
        assert await codes(principal) == want, principal
    assert list((await admin.GetDeployment(pb.GetDeploymentRequest(name=acl))).shared_with) == [
        "vision"
    ]


async def test_lists_hold_only_the_callers_teams(serving: Serving, acl: str) -> None:
    async def listed(principal: Principal, team: str = "") -> list[str]:
        async with channel_as(serving.address, principal) as channel:
            page = await serving_pb2_grpc.ServingServiceStub(channel).ListDeployments(
                pb.ListDeploymentsRequest(team=team, page_size=500)
            )
        return [d.name for d in page.deployments]

    mine = await listed(ML_VIEWER)
    assert acl in mine and all(
        d.team == "ml"
        for d in (await serving.stub.ListDeployments(pb.ListDeploymentsRequest())).deployments
        if d.name in mine
    )
    assert await listed(VISION_VIEWER) == [] and await listed(OUTSIDER) == []
    assert acl in await listed(ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await listed(VISION_VIEWER, team="ml")
    assert caught.value.code() == NOT_FOUND and "team 'ml'" in caught.value.details()


async def test_unsharing_takes_inference_away_at_once(serving: Serving, acl: str) -> None:
    async with channel_as(serving.address, ML_MAINTAINER) as channel:
        stub = serving_pb2_grpc.ServingServiceStub(channel)
        unshared = await stub.ShareDeployment(pb.ShareDeploymentRequest(name=acl, teams=[]))
        assert list(unshared.shared_with) == []
        assert (await _inference_codes(serving.address, VISION_VIEWER))["ModelInfer"] == NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ShareDeployment(pb.ShareDeploymentRequest(name=acl, teams=["ml"]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        shared = await stub.ShareDeployment(
            pb.ShareDeploymentRequest(name=acl, teams=["vision", "nlp"])
        )
        assert list(shared.shared_with) == ["nlp", "vision"]
        assert (await _inference_codes(serving.address, OUTSIDER))["ModelInfer"] == OK
        await stub.ShareDeployment(pb.ShareDeploymentRequest(name=acl, teams=["vision"]))


async def test_serving_asks_the_registry_as_its_own_service_identity(
    serving: Serving, registry: tuple[FakeRegistry, str], acl: str
) -> None:
    fake, _ = registry
    assert fake.callers == {Principal.service("serving")}


async def test_inference_with_triton_down_names_the_serving_engine(
    serving: Serving, triton: Triton
) -> None:
    """Last in the module: it stops the module's Triton."""
    client = _client(serving)
    try:
        assert (await asyncio.to_thread(_infer, client, "champion", np.zeros((1, 10)))).shape == (
            1,
            1,
        )
        await triton.process.stop()
        for call in (
            lambda: _infer(client, "champion", np.zeros((1, 10))),
            lambda: client.is_model_ready("champion"),
        ):
            with pytest.raises(InferenceServerException) as caught:
                await asyncio.to_thread(call)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
            assert "serving engine (Triton) is not answering" in caught.value.message()
    finally:
        client.close()
    # What serving knows about the deployment is still there to read.
    deployment = await serving.stub.GetDeployment(pb.GetDeploymentRequest(name="champion"))
    assert deployment.serving_version == "1"
