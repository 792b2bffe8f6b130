"""Component test: a real ``mlflow server`` driven by MlflowServer, fed by the example job."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plinth_common.mlflow_client import skip_feast_mlflow_header_provider
from plinth_common.net import free_tcp_port
from plinth_common.process import group_alive
from services.registry.mlflow_engine import MlflowServer, MlflowSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "examples" / "train_diabetes.py"


@pytest.fixture
async def mlflow_server(tmp_path: Path) -> AsyncIterator[MlflowServer]:
    settings = MlflowSettings(
        backend_store_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifacts_destination=str(tmp_path / "artifacts"),
        port=free_tcp_port(),
    )
    server = MlflowServer(settings, log_path=tmp_path / "mlflow-server.log")
    await server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        await server.stop()


async def _run_training(tracking_uri: str, output_file: Path, *args: str) -> str:
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_EXPERIMENT_NAME="plinth-component-test",
        PLINTH_OUTPUT_FILE=str(output_file),
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(TRAIN_SCRIPT),
        *args,
        env=env,
        cwd=str(output_file.parent),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


async def test_training_job_logs_to_mlflow_server(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import mlflow
    import mlflow.pyfunc
    from sklearn.datasets import load_diabetes

    skip_feast_mlflow_header_provider()  # else the first client call imports Feast (5-12 s)

    assert await mlflow_server.is_ready()
    tracking_uri = mlflow_server.tracking_uri
    assert tracking_uri == f"http://127.0.0.1:{mlflow_server.settings.port}"

    output_file = tmp_path / "job" / "output.json"
    output_file.parent.mkdir()
    log = await _run_training(
        tracking_uri, output_file, "--n-estimators", "50", "--learning-rate", "0.1"
    )
    assert "rmse=" in log
    # Says how the server ended if it did (it was once found dead here, in a full suite run).
    assert await mlflow_server.is_ready(), (
        f"mlflow server pid {mlflow_server.pid}: {mlflow_server.log_tail()}"
    )

    output = json.loads(output_file.read_text())
    run_id = output["mlflow_run_id"]
    assert output["model_uri"] == f"runs:/{run_id}/model"

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert set(run.data.metrics) >= {"rmse", "mae", "r2"}
    assert run.data.metrics["rmse"] > 0
    assert run.data.params["n_estimators"] == "50"
    assert run.data.params["learning_rate"] == "0.1"
    assert run.data.params["model"] == "gbr"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "plinth-component-test"
    # Proxied artifacts: the client never sees the server's folder, only the URI scheme.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")

    # MLflow 3 stores the model as a LoggedModel linked to the run.
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    [logged] = [m for m in models if m.source_run_id == run_id]
    assert logged.name == "model"
    assert logged.artifact_location.startswith("mlflow-artifacts:")
    files = {f.path for f in client.list_logged_model_artifacts(logged.model_id)}
    assert {"MLmodel", "model.skops", "requirements.txt", "input_example.json"} <= files
    # The artifacts physically live under artifacts_destination.
    destination = Path(mlflow_server.settings.artifacts_destination)
    stored = list(destination.rglob(f"{logged.model_id}/artifacts/MLmodel"))
    assert len(stored) == 1, sorted(str(p) for p in destination.rglob("*"))
    assert (stored[0].parent / "model.skops").is_file()
    requirements = (stored[0].parent / "requirements.txt").read_text().split()
    assert any(r.startswith("scikit-learn==") for r in requirements)

    # The URI the job reported loads and predicts (runs:/ resolves through the tracking URI;
    # without it MLflow would open ./mlflow.db in the working folder). Set globally, not only
    # in the environment: an earlier in-process serving (test_kserve_binary) left MLflow's
    # global URI on its own, stopped server, and the global one wins over the variable.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(output["model_uri"])
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert model.metadata.signature is not None
    features, _ = load_diabetes(return_X_y=True, as_frame=True)
    predictions = model.predict(features.head(5))
    assert len(predictions) == 5
    assert all(25.0 < float(p) < 350.0 for p in predictions)

    pgid = mlflow_server.pid
    assert pgid is not None
    await mlflow_server.stop()
    assert await mlflow_server.is_ready() is False
    assert mlflow_server.pid is None
    assert not group_alive(pgid)  # the uvicorn worker went with its parent
    await mlflow_server.stop()  # idempotent


async def test_wait_ready_reports_a_dead_server(tmp_path: Path):
    settings = MlflowSettings(
        backend_store_uri="notascheme://nowhere",
        artifacts_destination=str(tmp_path / "artifacts"),
        port=free_tcp_port(),
    )
    server = MlflowServer(settings, log_path=tmp_path / "mlflow-server.log")
    await server.start()
    try:
        with pytest.raises(RuntimeError, match="exited"):
            await server.wait_ready(timeout=120)
    finally:
        await server.stop()
    assert await server.is_ready() is False


async def test_a_server_killed_alone_is_restarted_on_its_port_without_its_old_worker(
    mlflow_server: MlflowServer,
):
    pid = mlflow_server.pid
    assert pid is not None
    # kill -9 of the mlflow process only: its uvicorn worker may keep the port.
    os.kill(pid, signal.SIGKILL)
    how = await asyncio.wait_for(mlflow_server.wait_exited(), 10)
    assert how == "was killed by SIGKILL"
    assert await mlflow_server.is_ready() is False

    await mlflow_server.restart()
    await mlflow_server.wait_ready(timeout=120)
    assert mlflow_server.pid not in (None, pid)
    assert not group_alive(pid)  # the old run's worker went before the new run started
    assert await mlflow_server.is_ready()


async def test_an_external_server_is_never_seen_exiting(tmp_path: Path):
    settings = MlflowSettings(
        backend_store_uri="postgresql://ignored",
        artifacts_destination="s3://ignored",
        port=5000,
        external_url="http://mlflow.internal:5000/",
    )
    server = MlflowServer(settings, log_path=tmp_path / "mlflow-server.log")
    await server.restart()  # launches nothing
    assert server.pid is None
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(server.wait_exited(), 0.2)


async def test_external_url_launches_nothing(tmp_path: Path):
    settings = MlflowSettings(
        backend_store_uri="postgresql://ignored",
        artifacts_destination="s3://ignored",
        port=5000,
        external_url="http://mlflow.internal:5000/",
    )
    server = MlflowServer(settings, log_path=tmp_path / "unused.log")
    assert server.tracking_uri == "http://mlflow.internal:5000"
    await server.start()
    assert server.pid is None
    assert not (tmp_path / "unused.log").exists()


OWNER = """
import asyncio, sys
from pathlib import Path
from plinth_common.net import free_tcp_port
from services.registry.mlflow_engine import MlflowServer, MlflowSettings

async def main() -> None:
    folder = Path(sys.argv[1])
    server = MlflowServer(
        MlflowSettings(
            backend_store_uri=f"sqlite:///{folder / 'mlflow.db'}",
            artifacts_destination=str(folder / "artifacts"),
            port=free_tcp_port(),
        ),
        log_path=folder / "mlflow-server.log",
    )
    await server.start()
    await server.wait_ready(timeout=120)
    print(server.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(stat.parent.name))
    return members


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
async def test_server_and_workers_die_with_a_killed_registry(tmp_path: Path):
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OWNER, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert owner.stdout is not None
        line = await asyncio.wait_for(owner.stdout.readline(), timeout=150)
        pgid = int(line)
        assert len(_group_members(pgid)) >= 2  # mlflow's CLI and its uvicorn server
        owner.kill()  # as kill -9: the registry gets no chance to stop MLflow
        await owner.wait()
        deadline = time.monotonic() + 30
        while _group_members(pgid):
            assert time.monotonic() < deadline, f"left running: {_group_members(pgid)}"
            await asyncio.sleep(0.1)
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()


async def test_with_basic_auth_the_server_refuses_anonymous_calls_and_answers_its_admin(
    tmp_path: Path,
) -> None:
    import aiohttp

    from services.registry.mlflow_auth import MlflowAuth

    auth = MlflowAuth(
        admin_username="plinth-admin",
        admin_password="engine-test-admin-password-0123",
        config_path=tmp_path / "auth" / "basic_auth.ini",
        database_uri=f"sqlite:///{tmp_path / 'auth' / 'basic_auth.db'}",
        secret_key="engine-test-flask-secret",
    )
    settings = MlflowSettings(
        backend_store_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifacts_destination=str(tmp_path / "artifacts"),
        port=free_tcp_port(),
        auth=auth,
    )
    server = MlflowServer(settings, log_path=tmp_path / "mlflow-server.log")
    started = time.monotonic()
    await server.start()
    try:
        # The basic-auth app adds a user database to migrate: still within the tests' bound.
        await server.wait_ready(timeout=60)
        print(f"MLflow with basic-auth ready in {time.monotonic() - started:.1f}s")
        url = f"{server.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as anonymous:
                assert anonymous.status == 401
            async with session.get(url, headers=auth.headers()) as admin:
                assert admin.status == 200
        config = auth.config_path.read_text()
        assert "default_permission = NO_PERMISSIONS" in config
        assert auth.admin_password not in config  # it reaches the server by its environment
        assert auth.config_path.stat().st_mode & 0o077 == 0
        assert (tmp_path / "auth" / "basic_auth.db").is_file()
    finally:
        await server.stop()
