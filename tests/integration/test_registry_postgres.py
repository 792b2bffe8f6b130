"""The registry with MLflow's backend store on PostgreSQL (as in production), and its own store
(outbox, processed events) on PostgreSQL too: registration from job.finished and by RPC,
a policy, promotion.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from plinth.events.v1 import events_pb2
from plinth.registry.v1 import registry_pb2 as pb
from plinth.registry.v1 import registry_pb2_grpc
from plinth_common.events import EventBus, new_event
from plinth_common.nats_server import NatsServer
from plinth_common.net import free_tcp_port
from services.registry.app import RegistryApp, RegistrySettings
from services.registry.mlflow_engine import MlflowServer, MlflowSettings
from services.registry.store import outbox_table
from tests.component.test_registry import Trainer, finished
from tests.helpers import EventRecorder, channel_as, eventually, service_env

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


@pytest_asyncio.fixture(loop_scope="session")
async def mlflow_database(postgres_database: str) -> AsyncIterator[str]:
    """A second fresh database, for MLflow: MLflow and the registry's store both keep an
    ``alembic_version`` table, so they cannot share one. Yields a psycopg2 (sync) URL."""
    import asyncpg

    admin_url = make_url(os.environ["PLINTH_TEST_POSTGRES_URL"])
    name = f"plinth_mlflow_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(
        admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield admin_url.set(drivername="postgresql", database=name).render_as_string(
            hide_password=False
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import Ridge

    x = np.arange(30, dtype=float).reshape(10, 3)
    path = tmp_path / "model"
    mlflow.sklearn.save_model(
        Ridge().fit(x, x.sum(axis=1)),
        str(path),
        serialization_format="cloudpickle",
        pip_requirements=["scikit-learn"],
    )
    return path


async def test_registry_registers_and_promotes_on_postgres(
    tmp_path: Path,
    nats_server: NatsServer,
    postgres_database: str,
    mlflow_database: str,
    model_dir: Path,
) -> None:
    from plinth_common.mlflow_client import skip_feast_mlflow_header_provider

    skip_feast_mlflow_header_provider()
    server = MlflowServer(
        MlflowSettings(
            backend_store_uri=mlflow_database,
            artifacts_destination=str(tmp_path / "artifacts"),
            port=free_tcp_port(),
        ),
        log_path=tmp_path / "mlflow-server.log",
    )
    env = service_env(
        tmp_path / "data",
        nats_server.url,
        PLINTH_REGISTRY_DATABASE_URL=postgres_database,
        PLINTH_MLFLOW_URL=server.tracking_uri,
        PLINTH_MLFLOW_BACKEND_STORE_URI=mlflow_database,
        # This test's MLflow runs open (the PostgreSQL store is what it is about).
        PLINTH_MLFLOW_AUTH="false",
    )
    app = RegistryApp(RegistrySettings.from_env(env))
    bus = EventBus(nats_server.url, name="registry-pg-test")
    await server.start()
    try:
        await server.wait_ready(timeout=240)  # migrating an empty PostgreSQL database takes a while
        await app.start()
        await bus.start()
        await app.wait_ready(timeout=120)
        trainer = await asyncio.to_thread(Trainer, server.tracking_uri, model_dir)
        good = await asyncio.to_thread(trainer.train, {"rmse": 51.0})
        bad = await asyncio.to_thread(trainer.train, {"rmse": 70.0})
        name = f"pg-{uuid.uuid4().hex[:8]}"
        async with (
            channel_as(f"127.0.0.1:{app.port}") as channel,
            EventRecorder(nats_server.url) as recorder,
        ):
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            job = finished(name, good)
            event = new_event(job, source="/plinth/scheduler", subject=job.job_id, team=job.team)
            await (await bus.connected()).publish(event.type, event.data, headers=event.headers())

            async def first_version() -> pb.ModelVersion | None:
                try:
                    return await stub.GetModelVersion(
                        pb.GetModelVersionRequest(name=name, version="1")
                    )
                except grpc.aio.AioRpcError:
                    return None

            v1 = await eventually(first_version, timeout=60)
            assert v1 is not None
            assert (
                v1.tags["plinth.job_id"] == job.job_id
                and v1.metrics["rmse"] == 51.0
                and v1.team == "ml"
            )
            v2 = await stub.CreateModelVersion(
                pb.CreateModelVersionRequest(name=name, team="ml", run_id=bad)
            )
            assert v2.version == "2"

            policy = pb.PromotionPolicy(rules=[pb.PolicyRule(metric="rmse", op="<", threshold=60)])
            await stub.SetPolicy(pb.SetPolicyRequest(name=name, policy=policy))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SetAlias(pb.SetAliasRequest(name=name, alias="production", version="2"))
            assert (
                refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                and "rmse = 70" in refused.value.details()
            )
            promoted = await stub.SetAlias(
                pb.SetAliasRequest(name=name, alias="production", version="1")
            )
            assert promoted.previous_version == "" and list(promoted.version.aliases) == [
                "production"
            ]
            by_alias = await stub.GetModelVersionByAlias(
                pb.GetModelVersionByAliasRequest(name=name, alias="production")
            )
            assert by_alias.version == "1" and by_alias.source == v1.source
            found = await stub.SearchModels(pb.SearchModelsRequest(name_prefix="pg-", team="ml"))
            assert name in [m.name for m in found.models]

            def types() -> list[str]:
                return [
                    m.subject
                    for m in recorder.messages
                    if (m.headers or {}).get("ce-subject") == name
                ]

            await eventually(
                lambda: _async(
                    types() == ["plinth.model.version_created"] * 2 + ["plinth.model.promoted"]
                )
            )
            promotion = next(
                m
                for m in recorder.messages
                if m.subject == "plinth.model.promoted"
                and (m.headers or {}).get("ce-subject") == name
            )
            payload = events_pb2.ModelPromoted.FromString(promotion.data)
            assert (payload.version, payload.previous_version, payload.source, payload.run_id) == (
                "1",
                "",
                v1.source,
                good,
            )
        async with app.runtime.db.read() as session:
            unpublished = (
                await session.execute(
                    sa.select(sa.func.count()).where(outbox_table.c.published_at.is_(None))
                )
            ).scalar_one()
        assert unpublished == 0
    finally:
        await bus.stop()
        await app.stop()
        await server.stop()


async def _async(value: object) -> object:
    return value
