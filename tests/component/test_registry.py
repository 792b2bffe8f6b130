"""The registry as a real gRPC server on a real MLflow server (SQLite, artifact proxy) and a real
nats-server: registration from job.finished, ownership, policies and promotion, searches.

One MLflow server and one registry serve the whole module; tests use their own model names.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from plinth.events.v1 import events_pb2
from plinth.registry.v1 import registry_pb2 as pb
from plinth.registry.v1 import registry_pb2_grpc
from plinth_common.events import CloudEvent, EventBus, new_event
from plinth_common.nats_server import NatsServer
from plinth_common.net import free_tcp_port
from plinth_common.rich_status import details_of
from services.registry.app import RegistryApp, RegistrySettings
from services.registry.mlflow_auth import MlflowAuth
from services.registry.mlflow_engine import MlflowServer, MlflowSettings
from tests.helpers import ADMIN, EventRecorder, channel_as, eventually, service_env

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Trainer:
    """Logs runs with metrics and an MLflow LoggedModel through the tracking server, as jobs do."""

    def __init__(self, tracking_uri: str, model_dir: Path) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.model_dir = model_dir
        self.experiment_id = self.client.create_experiment(f"registry-test-{uuid.uuid4().hex[:8]}")

    def train(
        self,
        metrics: Mapping[str, float],
        *,
        model_name: str = "model",
        params: Mapping[str, str] | None = None,
    ) -> str:
        """A finished run that logged ``metrics`` and a model named ``model_name``; returns its id."""
        from mlflow.entities import LoggedModelOutput, Metric, Param

        run_id = self.client.create_run(self.experiment_id).info.run_id
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in (params or {}).items()],
        )
        logged = self.client.create_logged_model(
            self.experiment_id, name=model_name, source_run_id=run_id
        )
        self.client.log_model_artifacts(logged.model_id, str(self.model_dir))
        self.client.finalize_logged_model(logged.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, 0)])
        self.client.set_terminated(run_id)
        return run_id


class Registry:
    """The running registry app and a stub to it."""

    def __init__(self, app: RegistryApp, mlflow: MlflowServer, trainer: Trainer, js: Any) -> None:
        self.app = app
        self.mlflow = mlflow
        self.trainer = trainer
        self.js = js
        self.channel = channel_as(f"127.0.0.1:{app.port}", ADMIN)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)

    async def train(self, metrics: Mapping[str, float], **options: Any) -> str:
        return await asyncio.to_thread(self.trainer.train, metrics, **options)

    async def register(
        self, name: str, run_id: str, *, team: str = "ml", **fields: Any
    ) -> pb.ModelVersion:
        return await self.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(name=name, team=team, run_id=run_id, **fields)
        )

    async def job_finished(self, payload: events_pb2.JobFinished) -> CloudEvent:
        """Publishes ``plinth.job.finished`` as the scheduler would."""
        event = new_event(
            payload, source="/plinth/scheduler", subject=payload.job_id, team=payload.team
        )
        await self.publish(event)
        return event

    async def publish(self, event: CloudEvent, *, msg_id: str = "") -> None:
        """Publishes an event; ``msg_id`` defeats JetStream's duplicate window, so the same event
        arrives again as a redelivery would."""
        headers = event.headers()
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        await self.js.publish(event.type, event.data, headers=headers)

    async def versions(self, name: str) -> list[pb.ModelVersion]:
        try:
            return list(
                (await self.stub.ListModelVersions(pb.ListModelVersionsRequest(name=name))).versions
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small scikit-learn model saved in MLflow's format (cloudpickle: no skops import)."""
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import Ridge

    x = np.arange(30, dtype=float).reshape(10, 3)
    path = tmp_path_factory.mktemp("model") / "model"
    mlflow.sklearn.save_model(
        Ridge().fit(x, x.sum(axis=1)),
        str(path),
        serialization_format="cloudpickle",
        pip_requirements=["scikit-learn"],
    )
    return path


#: MLflow's admin in this module: the server's basic-auth app and the registry agree on it.
MLFLOW_ADMIN, MLFLOW_ADMIN_PASSWORD = "plinth-admin", "registry-test-admin-password-0123"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MlflowServer]:
    """MLflow with its own authentication, as the registry runs it; this process's MLflow
    clients (the trainer) call it as the admin."""
    root = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(
        MlflowSettings(
            backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
            artifacts_destination=str(root / "artifacts"),
            port=free_tcp_port(),
            auth=MlflowAuth(
                admin_username=MLFLOW_ADMIN,
                admin_password=MLFLOW_ADMIN_PASSWORD,
                config_path=root / "basic_auth.ini",
                database_uri=f"sqlite:///{root / 'basic_auth.db'}",
                secret_key="registry-test-flask-secret",
            ),
        ),
        log_path=root / "server.log",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_ADMIN_PASSWORD)
        await server.start()
        try:
            await server.wait_ready(timeout=120)
            yield server
        finally:
            await server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def registry(
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    mlflow_server: MlflowServer,
    model_dir: Path,
) -> AsyncIterator[Registry]:
    from plinth_common.mlflow_client import skip_feast_mlflow_header_provider

    # MLflow's first HTTP request would otherwise import all of Feast (see the example job).
    skip_feast_mlflow_header_provider()
    env = service_env(
        tmp_path_factory.mktemp("registry"),
        nats_server.url,
        PLINTH_MLFLOW_URL=mlflow_server.tracking_uri,
        PLINTH_MLFLOW_BACKEND_STORE_URI=mlflow_server.settings.backend_store_uri,
        PLINTH_MLFLOW_ADMIN_USERNAME=MLFLOW_ADMIN,
        PLINTH_MLFLOW_ADMIN_PASSWORD=MLFLOW_ADMIN_PASSWORD,
    )
    app = RegistryApp(RegistrySettings.from_env(env))
    trainer = await asyncio.to_thread(Trainer, mlflow_server.tracking_uri, model_dir)
    bus = EventBus(nats_server.url, name="registry-test")
    await app.start()
    await bus.start()
    try:
        await app.wait_ready(timeout=120)
        registry = Registry(app, mlflow_server, trainer, await bus.connected())
        yield registry
        await registry.channel.close()
    finally:
        await bus.stop()
        await app.stop()


def unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def finished(
    name: str, run_id: str, *, job_id: str = "", team: str = "ml", succeeded: bool = True
) -> events_pb2.JobFinished:
    return events_pb2.JobFinished(
        job_id=job_id or f"j-{uuid.uuid4().hex[:12]}",
        name="train",
        team=team,
        status=events_pb2.JOB_OUTCOME_SUCCEEDED if succeeded else events_pb2.JOB_OUTCOME_FAILED,
        exit_code=0 if succeeded else 1,
        mlflow_run_id=run_id,
        outputs={"mlflow_run_id": run_id, "model_uri": f"runs:/{run_id}/model"},
        register_as=name,
        entrypoint=["python", "train.py", "--alpha", "0.5"],
    )


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def events_of(recorder: EventRecorder, subject: str, event_type: str) -> list[Any]:
    return [
        m
        for m in recorder.messages
        if m.subject == event_type and (m.headers or {}).get("ce-subject") == subject
    ]


# -- registration from plinth.job.finished ------------------------------------------------------


async def test_finished_job_registers_a_version_with_lineage_and_an_event(
    registry: Registry, nats_server: NatsServer, spans: Any
) -> None:
    name, failed_name = unique("diabetes"), unique("failed")
    run_id = await registry.train({"rmse": 55.5, "r2": 0.41})
    async with EventRecorder(nats_server.url) as recorder:
        await registry.job_finished(finished(failed_name, run_id, succeeded=False))
        job = finished(name, run_id)
        await registry.job_finished(job)
        created = await eventually(
            lambda: _async(events_of(recorder, name, "plinth.model.version_created")), timeout=30
        )

    version = await registry.stub.GetModelVersion(pb.GetModelVersionRequest(name=name, version="1"))
    assert version.team == "ml" and version.run_id == run_id and version.status == "READY"
    assert version.tags["plinth.job_id"] == job.job_id
    assert version.tags["plinth.run_id"] == run_id
    assert version.tags["plinth.entrypoint"] == "python train.py --alpha 0.5"
    assert (
        float(version.tags["plinth.metric.rmse"]) == 55.5
        and float(version.tags["plinth.metric.r2"]) == 0.41
    )
    assert dict(version.metrics) == {"rmse": 55.5, "r2": 0.41}
    assert version.source.startswith("mlflow-artifacts:/") and version.model_id.startswith("m-")

    headers = created[0].headers
    assert (
        headers["ce-type"] == "plinth.model.version_created"
        and headers["ce-source"] == "/plinth/registry"
    )
    assert (
        headers["ce-specversion"] == "1.0"
        and headers["ce-team"] == "ml"
        and headers["ce-id"] == headers["Nats-Msg-Id"]
    )
    payload = events_pb2.ModelVersionCreated.FromString(created[0].data)
    assert (payload.model_name, payload.version, payload.team, payload.run_id, payload.source_job_id, payload.source) == (
        name, "1", "ml", run_id, job.job_id, version.source,
    )  # fmt: skip

    # Handling job.finished and publishing version_created are one trace.
    def traced() -> bool:
        finished_spans = spans.get_finished_spans()
        handled = {
            s.context.trace_id for s in finished_spans if s.name == "plinth.job.finished process"
        }
        published = {
            s.context.trace_id
            for s in finished_spans
            if s.name == "plinth.model.version_created publish"
        }
        return bool(published) and published <= handled

    await eventually(lambda: _async(traced()))

    # The failed job was handled before the successful one (one consumer, in order): nothing.
    assert await registry.versions(failed_name) == []
    error = await rpc_error(
        registry.stub.GetModelVersion(pb.GetModelVersionRequest(name=failed_name, version="1"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and failed_name in error.details()


async def test_same_event_twice_registers_one_version(
    registry: Registry, nats_server: NatsServer
) -> None:
    name = unique("dup")
    run_id = await registry.train({"rmse": 50.0})
    consumer = registry.app.runtime.consumers[0]
    async with EventRecorder(nats_server.url) as recorder:
        event = await registry.job_finished(finished(name, run_id))
        duplicates = consumer.duplicates
        # The same CloudEvent again, past JetStream's duplicate window (as a redelivery would be).
        await registry.publish(event, msg_id=f"{event.id}-again")
        await eventually(
            lambda: _async(len(events_of(recorder, name, "plinth.model.version_created")) >= 1),
            timeout=30,
        )
        await eventually(lambda: _async(consumer.duplicates > duplicates))
    assert [v.version for v in await registry.versions(name)] == ["1"]


async def test_crash_between_mlflow_write_and_commit_does_not_register_twice(
    registry: Registry, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("crash")
    run_id = await registry.train({"rmse": 52.0})
    real = registry.app.events.add_version_created
    crashes: list[str] = []

    async def crash_once(session: Any, version: Any, *, job_id: str) -> None:
        """Fails the first version_created: MLflow has the version, the transaction rolls back."""
        if version.name == name and not crashes:
            crashes.append(version.version)
            raise RuntimeError("simulated crash before commit")
        await real(session, version, job_id=job_id)

    monkeypatch.setattr(registry.app.events, "add_version_created", crash_once)
    async with EventRecorder(nats_server.url) as recorder:
        job = finished(name, run_id)
        await registry.job_finished(job)
        created = await eventually(
            lambda: _async(events_of(recorder, name, "plinth.model.version_created")), timeout=30
        )
    # The event was published, so the delivery that recorded it committed the processed-event
    # row with it: any later delivery is a duplicate that registers nothing.
    assert crashes == ["1"], "the first delivery must have created the version, then failed"
    assert [v.version for v in await registry.versions(name)] == ["1"]
    assert len(events_of(recorder, name, "plinth.model.version_created")) == 1
    assert events_pb2.ModelVersionCreated.FromString(created[0].data).source_job_id == job.job_id


# -- CreateModelVersion, ownership, validation ------------------------------------------------


async def test_create_model_version_belongs_to_a_team(registry: Registry) -> None:
    name = unique("owned")
    run_id = await registry.train({"rmse": 58.0})
    first = await registry.register(
        name, run_id, tags={"dataset": "diabetes"}, model_tags={"task": "regression"}
    )
    assert (first.version, first.team, first.tags["dataset"], first.tags["plinth.run_id"]) == (
        "1",
        "ml",
        "diabetes",
        run_id,
    )
    second = await registry.register(name, run_id)
    assert second.version == "2"

    error = await rpc_error(registry.register(name, run_id, team="nlp"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'ml'" in error.details() and "'nlp'" in error.details()
    error = await rpc_error(registry.register(name, run_id, team=""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("team")
    error = await rpc_error(registry.register(name, run_id, tags={"plinth.job_id": "forged"}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("tags")
    error = await rpc_error(registry.register(name, "0" * 32))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "0" * 32 in error.details()
    error = await rpc_error(registry.register(name, run_id, artifact_path="other"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and f"runs:/{run_id}/other" in error.details()

    models = await registry.stub.SearchModels(pb.SearchModelsRequest(name_prefix=name))
    assert [(m.name, m.team, m.latest_version, dict(m.tags)) for m in models.models] == [
        (name, "ml", "2", {"task": "regression"})
    ]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"name": "../etc/passwd"}, "name"),
        ({"name": "a/../../b"}, "name"),
        ({"name": ".."}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"artifact_path": "../model"}, "artifact_path"),
        ({"artifact_path": "/abs/model"}, "artifact_path"),
        ({"run_id": "../r"}, "run_id"),
    ],
)
async def test_path_like_names_are_refused(
    registry: Registry, request_fields: dict[str, str], field: str
) -> None:
    fields = {"name": "ok", "team": "ml", "run_id": "a" * 32, **request_fields}
    error = await rpc_error(
        registry.stub.CreateModelVersion(pb.CreateModelVersionRequest(**fields))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(field), (
        error.details()
    )


@pytest.mark.parametrize(
    ("alias", "problem"),
    [
        ("../prod", "letters"),
        ("a/b", "letters"),
        ("latest", "reserved"),
        ("v3", "reserved"),
        ("", "letters"),
    ],
)
async def test_bad_aliases_are_refused(registry: Registry, alias: str, problem: str) -> None:
    error = await rpc_error(
        registry.stub.GetModelVersionByAlias(
            pb.GetModelVersionByAliasRequest(name="ok", alias=alias)
        )
    )
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT
        and error.details().startswith("alias")
        and problem in error.details()
    )


async def test_unknown_objects_are_not_found_by_name(registry: Registry) -> None:
    name = unique("nf")
    await registry.register(name, await registry.train({"rmse": 1.0}))
    cases = [
        (
            registry.stub.GetModelVersion(
                pb.GetModelVersionRequest(name="no-such-model", version="1")
            ),
            "no-such-model",
        ),
        (
            registry.stub.GetModelVersion(pb.GetModelVersionRequest(name=name, version="9")),
            f"{name}/9",
        ),
        (
            registry.stub.GetModelVersionByAlias(
                pb.GetModelVersionByAliasRequest(name=name, alias="production")
            ),
            f"{name}@production",
        ),
        (
            registry.stub.GetModelVersionByAlias(
                pb.GetModelVersionByAliasRequest(name="no-such-model", alias="production")
            ),
            "no-such-model",
        ),
        (
            registry.stub.ListModelVersions(pb.ListModelVersionsRequest(name="no-such-model")),
            "no-such-model",
        ),
        (registry.stub.GetRun(pb.GetRunRequest(run_id="f" * 32)), "f" * 32),
        (
            registry.stub.SetAlias(pb.SetAliasRequest(name=name, alias="production", version="7")),
            f"{name}/7",
        ),
        (
            registry.stub.DeleteAlias(pb.DeleteAliasRequest(name=name, alias="production")),
            f"{name}@production",
        ),
        (registry.stub.SetPolicy(pb.SetPolicyRequest(name="no-such-model")), "no-such-model"),
    ]
    for call, named in cases:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and named in error.details(), (
            error.details()
        )


# -- promotion ----------------------------------------------------------------------------------


async def test_policy_guards_promotion_and_promoted_event_carries_versions(
    registry: Registry, nats_server: NatsServer, spans: Any, tmp_path: Path
) -> None:
    name = unique("promo")
    good = await registry.register(name, await registry.train({"rmse": 55.0}))
    bad = await registry.register(name, await registry.train({"rmse": 63.2}))
    policy = pb.PromotionPolicy(
        rules=[pb.PolicyRule(metric="rmse", op="<", threshold=60)],
        require_approval=True,
        aliases=["production"],
    )
    answer = await registry.stub.SetPolicy(pb.SetPolicyRequest(name=name, policy=policy, team="ml"))
    assert answer.model.policy == policy and "plinth.policy" not in answer.model.tags
    assert list(answer.warnings) == []

    async def set_alias(
        version: str, *, alias: str = "production", approved: bool = True
    ) -> pb.SetAliasResponse:
        return await registry.stub.SetAlias(
            pb.SetAliasRequest(name=name, alias=alias, version=version, approved=approved)
        )

    error = await rpc_error(set_alias(bad.version))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "policy rule rmse < 60 does not hold: rmse = 63.2"
    rich = details_of(error.trailing_metadata())
    assert (rich.reason, rich.metadata.get("rule"), rich.metadata.get("value")) == (
        "POLICY_VIOLATION",
        "rmse < 60",
        "63.2",
    )
    error = await rpc_error(set_alias(good.version, approved=False))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        f"policy of {name!r} requires approval to move alias 'production': a maintainer of "
        "team 'ml' must approve version 1 for 'production' first (ApproveModelVersion)"
    )
    assert details_of(error.trailing_metadata()).reason == "APPROVAL_REQUIRED"
    error = await rpc_error(
        registry.stub.SetAlias(
            pb.SetAliasRequest(
                name=name, alias="production", version="1", approved=True, team="nlp"
            )
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "'ml'" in error.details()

    async with EventRecorder(nats_server.url) as recorder:
        staging = await set_alias(
            bad.version, alias="staging", approved=False
        )  # the policy guards production only
        assert staging.previous_version == "" and list(staging.version.aliases) == ["staging"]
        first = await set_alias(good.version)
        assert first.previous_version == "" and list(first.version.aliases) == ["production"]
        assert (
            await registry.stub.GetModelVersionByAlias(
                pb.GetModelVersionByAliasRequest(name=name, alias="production")
            )
        ).version == "1"

        # A metric the run never logged fails the rule too.
        missing = pb.PromotionPolicy(rules=[pb.PolicyRule(metric="auc", op=">=", threshold=0.9)])
        await registry.stub.SetPolicy(pb.SetPolicyRequest(name=name, policy=missing))
        error = await rpc_error(set_alias(bad.version))
        assert (
            error.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "policy rule auc >= 0.9 does not hold" in error.details()
        )
        assert "no metric 'auc'" in error.details()

        await registry.stub.SetPolicy(
            pb.SetPolicyRequest(name=name, policy=pb.PromotionPolicy())
        )  # removes it
        second = await set_alias(bad.version)
        assert second.previous_version == "1" and second.version.version == "2"
        assert (
            await registry.stub.GetModelVersionByAlias(
                pb.GetModelVersionByAliasRequest(name=name, alias="production")
            )
        ).version == "2"
        await eventually(
            lambda: _async(len(events_of(recorder, name, "plinth.model.promoted")) >= 3)
        )
    everything = [
        events_pb2.ModelPromoted.FromString(m.data)
        for m in events_of(recorder, name, "plinth.model.promoted")
    ]
    payloads = [p for p in everything if p.alias == "production"]
    assert [(p.alias, p.version, p.previous_version, p.team) for p in payloads] == [
        ("production", "1", "", "ml"),
        ("production", "2", "1", "ml"),
    ]
    # The admin's own approval (approved=True) was recorded: the event and history name it.
    assert [(p.promoted_by, p.approved_by) for p in payloads] == [
        (ADMIN.name, ADMIN.name),
        (ADMIN.name, ""),
    ]
    first_version = await registry.stub.GetModelVersion(
        pb.GetModelVersionRequest(name=name, version="1")
    )
    assert [(a.alias, a.approved_by) for a in first_version.approvals] == [
        ("production", ADMIN.name)
    ]
    assert [(h.alias, h.promoted_by, h.approved_by) for h in first_version.history] == [
        ("production", ADMIN.name, ADMIN.name)
    ]
    assert payloads[1].run_id == bad.run_id and payloads[1].source == bad.source

    # Serving downloads the promoted source through the tracking server and loads it.
    import mlflow.artifacts
    import mlflow.pyfunc

    local = await asyncio.to_thread(
        mlflow.artifacts.download_artifacts,
        artifact_uri=payloads[1].source,
        tracking_uri=registry.mlflow.tracking_uri,
        dst_path=str(tmp_path),
    )
    assert (Path(local) / "MLmodel").is_file()
    model_loaded = await asyncio.to_thread(mlflow.pyfunc.load_model, local)
    assert model_loaded.predict([[1.0, 2.0, 3.0]]).shape == (1,)

    # The SetAlias call and the publication of its event are one trace.
    def traced() -> bool:
        finished_spans = spans.get_finished_spans()
        calls = [
            s for s in finished_spans if s.name == "/plinth.registry.v1.RegistryService/SetAlias"
        ]
        publishes = [s for s in finished_spans if s.name == "plinth.model.promoted publish"]
        return bool(
            calls
            and publishes
            and {s.context.trace_id for s in publishes} <= {s.context.trace_id for s in calls}
        )

    await eventually(lambda: _async(traced()))

    previous = await registry.stub.DeleteAlias(pb.DeleteAliasRequest(name=name, alias="production"))
    assert previous.previous_version == "2"
    error = await rpc_error(
        registry.stub.GetModelVersionByAlias(
            pb.GetModelVersionByAliasRequest(name=name, alias="production")
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_invalid_policies_are_refused_naming_the_field(registry: Registry) -> None:
    name = unique("pol")
    await registry.register(name, await registry.train({"rmse": 1.0}))
    for rule, field in [
        (pb.PolicyRule(metric="rmse", op="<<", threshold=1), "policy.rules[0].op"),
        (pb.PolicyRule(metric="", op="<", threshold=1), "policy.rules[0].metric"),
        (pb.PolicyRule(metric="rmse", op="<", threshold=float("nan")), "policy.rules[0].threshold"),
    ]:
        error = await rpc_error(
            registry.stub.SetPolicy(
                pb.SetPolicyRequest(name=name, policy=pb.PromotionPolicy(rules=[rule]))
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(
            field
        ), error.details()


async def test_a_policy_update_merges_where_a_set_replaces_and_warns_of_unknown_metrics(
    registry: Registry,
) -> None:
    name = unique("merge")
    await registry.register(name, await registry.train({"rmse": 55.0, "r2": 0.5}))
    await registry.register(name, await registry.train({"rmse": 63.2, "r2": 0.4}))
    approval = pb.PromotionPolicy(require_approval=True, aliases=["production"])
    await registry.stub.SetPolicy(pb.SetPolicyRequest(name=name, policy=approval))

    # `plinth models policy NAME --rule "rsme < 70"`: a rule added, the approval kept, and the
    # misspelled metric named with the one the versions have.
    typo = pb.PolicyRule(metric="rsme", op="<", threshold=70)
    added = await registry.stub.SetPolicy(
        pb.SetPolicyRequest(name=name, update=pb.PolicyUpdate(add_rules=[typo]))
    )
    expected = pb.PromotionPolicy(rules=[typo], require_approval=True, aliases=["production"])
    assert added.model.policy == expected
    assert list(added.warnings) == [
        f"no version of {name!r} has a metric 'rsme' (did you mean 'rmse'?): promotions the "
        "policy guards fail until one does"
    ]
    shown = await registry.stub.GetPolicy(pb.GetPolicyRequest(name=name))
    assert shown.model.policy == expected and list(shown.warnings) == list(added.warnings)

    # Fixing it: remove the rules on the misspelled metric, add the right one, in one call.
    fixed = await registry.stub.SetPolicy(
        pb.SetPolicyRequest(
            name=name,
            update=pb.PolicyUpdate(
                remove_rule_metrics=["rsme"],
                add_rules=[pb.PolicyRule(metric="rmse", op="<", threshold=60)],
            ),
        )
    )
    assert [(r.metric, r.threshold) for r in fixed.model.policy.rules] == [("rmse", 60)]
    assert fixed.model.policy.require_approval and list(fixed.warnings) == []
    error = await rpc_error(
        registry.stub.SetAlias(pb.SetAliasRequest(name=name, alias="production", version="1"))
    )
    assert details_of(error.trailing_metadata()).reason == "APPROVAL_REQUIRED"

    # A replace keeps only what it says: the approval requirement and the aliases are gone.
    replaced = await registry.stub.SetPolicy(
        pb.SetPolicyRequest(
            name=name,
            policy=pb.PromotionPolicy(rules=[pb.PolicyRule(metric="r2", op=">=", threshold=0.45)]),
        )
    )
    assert not replaced.model.policy.require_approval and not replaced.model.policy.aliases
    promoted = await registry.stub.SetAlias(
        pb.SetAliasRequest(name=name, alias="production", version="1")
    )
    assert promoted.version.version == "1"

    # An update that leaves no rule and no approval removes the policy.
    emptied = await registry.stub.SetPolicy(
        pb.SetPolicyRequest(name=name, update=pb.PolicyUpdate(remove_rule_metrics=["r2"]))
    )
    assert emptied.model.policy == pb.PromotionPolicy()
    assert (await registry.stub.GetPolicy(pb.GetPolicyRequest(name=name))).model.policy == (
        pb.PromotionPolicy()
    )


async def test_policy_updates_are_checked_like_policies(registry: Registry) -> None:
    name = unique("upd")
    await registry.register(name, await registry.train({"rmse": 1.0}))
    for update, field in [
        (
            pb.PolicyUpdate(add_rules=[pb.PolicyRule(metric="rmse", op="=<", threshold=1)]),
            "update.add_rules[0].op",
        ),
        (pb.PolicyUpdate(aliases=pb.GuardedAliases(aliases=["latest"])), "update.aliases"),
    ]:
        error = await rpc_error(
            registry.stub.SetPolicy(pb.SetPolicyRequest(name=name, update=update))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(field), error.details()
    error = await rpc_error(registry.stub.GetPolicy(pb.GetPolicyRequest(name="no-such-model")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in error.details()


# -- reads ----------------------------------------------------------------------------------------


async def test_search_models_by_prefix_team_and_tag_in_pages(registry: Registry) -> None:
    base = uuid.uuid4().hex[:8]
    run_id = await registry.train({"rmse": 40.0})
    ml = [f"s{base}_ml{i}" for i in range(3)]
    for i, name in enumerate(ml):
        await registry.register(
            name, run_id, model_tags={"task": "regression" if i < 2 else "ranking"}
        )
    nlp = [f"s{base}_nlp{i}" for i in range(2)]
    for name in nlp:
        await registry.register(name, run_id, team="nlp")
    lookalike = f"s{base}Xml9"  # LIKE would match 's{base}_' here: '_' is its wildcard
    await registry.register(lookalike, run_id)

    async def search(**fields: Any) -> tuple[list[str], str]:
        response = await registry.stub.SearchModels(pb.SearchModelsRequest(**fields))
        return [m.name for m in response.models], response.next_page_token

    names, token = await search(name_prefix=f"s{base}_", page_size=2)
    assert names == sorted(ml + nlp)[:2] and token
    collected = list(names)
    while token:
        names, token = await search(name_prefix=f"s{base}_", page_size=2, page_token=token)
        collected += names
    assert collected == sorted(ml + nlp)
    assert (await search(name_prefix=f"s{base}", team="nlp"))[0] == nlp
    assert (await search(name_prefix=f"s{base}", team="ml"))[0] == sorted([*ml, lookalike])
    assert (await search(name_prefix=f"s{base}", tags={"task": "regression"}))[0] == ml[:2]
    assert (await search(name_prefix=f"s{base}", team="nlp", tags={"task": "regression"}))[0] == []
    error = await rpc_error(search(page_token="not-a-token"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(
        "page_token"
    )
    error = await rpc_error(search(name_prefix="a'b"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(
        "name_prefix"
    )


async def test_runs_are_read_through_from_tracking(registry: Registry) -> None:
    low = await registry.train({"rmse": 10.0}, params={"alpha": "0.1"})
    high = await registry.train({"rmse": 90.0})
    run = await registry.stub.GetRun(pb.GetRunRequest(run_id=low))
    assert run.metrics["rmse"] == 10.0 and run.params["alpha"] == "0.1" and run.status == "FINISHED"
    assert run.experiment_id == registry.trainer.experiment_id and run.artifact_uri.startswith(
        "mlflow-artifacts:/"
    )
    listed = await registry.stub.ListRuns(
        pb.ListRunsRequest(experiment_ids=[run.experiment_id], filter="metrics.rmse < 50")
    )
    ids = [r.run_id for r in listed.runs]
    assert low in ids and high not in ids
    everywhere = await registry.stub.ListRuns(
        pb.ListRunsRequest(filter=f"attributes.run_id = '{high}'")
    )
    assert [r.run_id for r in everywhere.runs] == [high]
    error = await rpc_error(
        registry.stub.ListRuns(
            pb.ListRunsRequest(experiment_ids=[run.experiment_id], filter="metrics.rmse <")
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("filter")
    error = await rpc_error(registry.stub.ListRuns(pb.ListRunsRequest(experiment_ids=["../1"])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(
        "experiment_ids"
    )


async def test_reads_see_own_writes_at_once_and_outside_writes_within_the_ttl(
    registry: Registry,
) -> None:
    name = unique("cache")
    run_id = await registry.train({"rmse": 30.0})
    for _ in range(2):
        await registry.register(name, run_id)
    request = pb.GetModelVersionByAliasRequest(name=name, alias="champion")
    await registry.stub.SetAlias(pb.SetAliasRequest(name=name, alias="champion", version="1"))
    assert (await registry.stub.GetModelVersionByAlias(request)).version == "1"  # now cached
    await registry.stub.SetAlias(pb.SetAliasRequest(name=name, alias="champion", version="2"))
    assert (
        await registry.stub.GetModelVersionByAlias(request)
    ).version == "2"  # own write: at once

    # Behind the registry's back (MLflow's own client on the server): visible within the TTL.
    await asyncio.to_thread(
        registry.trainer.client.set_registered_model_alias, name, "champion", "1"
    )
    started = time.monotonic()

    async def moved() -> bool:
        return (await registry.stub.GetModelVersionByAlias(request)).version == "1"

    await eventually(moved, timeout=10)
    assert time.monotonic() - started <= registry.app.settings.cache_ttl_s + 1.0


async def test_server_and_in_process_store_share_sqlite_without_lock_errors(
    registry: Registry,
) -> None:
    """Jobs write through the server while the registry writes in-process: busy timeouts, no errors."""
    name = unique("busy")
    run_id = await registry.train({"rmse": 20.0})
    await registry.register(name, run_id)
    from mlflow.entities import Metric

    def job_logging() -> int:
        live = registry.trainer.client.create_run(registry.trainer.experiment_id).info.run_id
        for step in range(40):
            registry.trainer.client.log_batch(
                live, metrics=[Metric("loss", 1.0 / (step + 1), int(time.time() * 1000), step)]
            )
        return 40

    async def registry_writing() -> int:
        for i in range(8):
            await registry.register(name, run_id)
            await registry.stub.SetAlias(
                pb.SetAliasRequest(name=name, alias="candidate", version=str(i + 1))
            )
        return 8

    logged, written = await asyncio.gather(asyncio.to_thread(job_logging), registry_writing())
    assert (logged, written) == (40, 8)
    assert len(await registry.versions(name)) == 9


async def _async(value: Any) -> Any:
    return value
