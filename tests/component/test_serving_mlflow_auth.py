"""Serving downloads a version's artifacts from an MLflow server that runs MLflow's basic-auth
app (default permission none), with the platform's MLflow admin credentials; without them the
server refuses. A real ``mlflow server --app-name basic-auth``."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from plinth_common.net import free_tcp_port
from services.registry.mlflow_auth import MlflowAuth
from services.registry.mlflow_engine import MlflowServer, MlflowSettings
from services.serving.artifacts import ArtifactError, MlflowArtifacts

pytestmark = pytest.mark.asyncio(loop_scope="session")

_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
ADMIN = "plinth-admin"


@pytest.fixture
def clean_credentials() -> Iterator[None]:
    """No MLflow credentials in this process's environment, before and after the test (serving
    puts its own there, as it does in its own process)."""
    saved = {name: os.environ.pop(name, None) for name in _CREDENTIALS}
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


@pytest_asyncio.fixture(loop_scope="session")
async def secured(tmp_path: Path) -> AsyncIterator[tuple[MlflowServer, str]]:
    """A basic-auth MLflow server, and its admin's password."""
    password = secrets.token_hex(16)
    server = MlflowServer(
        MlflowSettings(
            backend_store_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            artifacts_destination=str(tmp_path / "artifacts"),
            port=free_tcp_port(),
            auth=MlflowAuth(
                admin_username=ADMIN,
                admin_password=password,
                config_path=tmp_path / "basic_auth.ini",
                database_uri=f"sqlite:///{tmp_path / 'auth' / 'basic_auth.db'}",
                secret_key=secrets.token_hex(16),
            ),
        ),
        log_path=tmp_path / "mlflow-server.log",
    )
    await server.start()
    try:
        await server.wait_ready()
        yield server, password
    finally:
        await server.stop()


def _log_folder(tracking_uri: str, password: str, folder: Path) -> str:
    """Logs ``folder`` as the artifact ``model`` of a new run, as the admin; its ``runs:`` URI."""
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = (
        ADMIN,
        password,
    )
    try:
        client = MlflowClient(tracking_uri)
        experiment = client.create_experiment(f"serving-auth-{secrets.token_hex(4)}")
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
        return f"runs:/{run.info.run_id}/model"
    finally:
        for name in _CREDENTIALS:
            os.environ.pop(name, None)


async def test_downloads_use_the_admin_credentials_on_a_secured_server(
    secured: tuple[MlflowServer, str], tmp_path: Path, clean_credentials: None
) -> None:
    server, password = secured
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors: {}\n")
    source = await asyncio.to_thread(_log_folder, server.tracking_uri, password, model)

    with pytest.raises(ArtifactError) as refused:
        await MlflowArtifacts(server.tracking_uri).download(source, tmp_path / "anonymous")
    assert "401" in str(refused.value) and password not in str(refused.value)

    artifacts = MlflowArtifacts(server.tracking_uri, credentials=(ADMIN, password))
    local = await artifacts.download(source, tmp_path / "admin")
    assert (local / "MLmodel").read_text() == "flavors: {}\n"
