"""The example training job through the scheduler app onto a real Ray head and a real SLURM
cluster, chosen by flavor, logging to a real MLflow server: it ends SUCCEEDED with its MLflow
run id exactly as with the local executor; a cancelled job ends on the engine too (STOPPED on
Ray; CANCELLED, or FAILED when it ended on SLURM's SIGTERM, in SLURM).

One Ray head and one SLURM cluster for the module (the head takes minutes on a loaded machine).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from plinth_common.nats_server import NatsServer
from plinth_common.net import free_tcp_port
from plinth_common.ray_head import RayHead
from plinth_common.slurm_cluster import SlurmCluster
from services.registry.mlflow_engine import MlflowServer, MlflowSettings
from services.scheduler.app import SchedulerApp, SchedulerSettings
from services.scheduler.domain import Job, JobSpec, JobState, Resources
from services.scheduler.executors.ray import submission_id
from tests.helpers import ADMIN, eventually, service_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
    pytest.mark.asyncio(loop_scope="session"),
]

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(REPO / "examples" / "train_diabetes.py"), "--model", "ridge"]
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    ok, why = RayHead.available()
    if not ok:
        pytest.skip(f"no Ray head: {why}")
    with RayHead(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    ok, why = SlurmCluster.available()
    if not ok:
        pytest.skip(f"no SLURM cluster: {why}")
    with SlurmCluster(extra_config={"MinJobAge": "300"}) as cluster:
        yield cluster


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(
        MlflowSettings(
            backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
            artifacts_destination=str(root / "artifacts"),
            port=free_tcp_port(),
            startup_timeout_s=300,
        ),
        log_path=root / "mlflow-server.log",
    )
    await server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        await server.stop()


def queues(flavor: str, executor: str, options: dict[str, str]) -> str:
    return json.dumps(
        {
            "flavors": [
                {"name": flavor, "executor": executor, "executor_options": options},
            ],
            "cluster_queues": [
                {
                    "name": "ml-queue",
                    "teams": ["ml"],
                    "flavors": [
                        {
                            "flavor": flavor,
                            "resources": {"cpu": {"nominal": 2}, "memory": {"nominal": "2Gi"}},
                        }
                    ],
                }
            ],
        }
    )


@pytest_asyncio.fixture(loop_scope="session")
async def scheduler(
    tmp_path: Path, nats_server: NatsServer, mlflow_server: MlflowServer
) -> AsyncIterator[SchedulerApp]:
    app = SchedulerApp(
        SchedulerSettings.from_env(
            service_env(
                tmp_path / "data",
                nats_server.url,
                PLINTH_SCHEDULER_MLFLOW_AUTH="none",
                PLINTH_MLFLOW_TRACKING_URI=mlflow_server.tracking_uri,
            )
        )
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def run_to_end(app: SchedulerApp, command: list[str], *, timeout: float) -> Job:
    job = await app.service.submit(
        ADMIN,
        JobSpec(
            name="train-diabetes",
            team="ml",
            entrypoint=tuple(command),
            working_dir=str(REPO),
            resources=Resources(cpu=1, memory_bytes=512 * 1024**2),
        ),
    )

    async def ended() -> Job | None:
        current = await app.service.get(ADMIN, job.id)
        return current if current.state.terminal else None

    return await eventually(ended, timeout=timeout, interval=0.5)


async def running(app: SchedulerApp, command: list[str]) -> Job:
    job = await app.service.submit(
        ADMIN,
        JobSpec(name="sleeper", team="ml", entrypoint=tuple(command), resources=Resources(cpu=1)),
    )

    async def started() -> Job | None:
        current = await app.service.get(ADMIN, job.id)
        assert not current.state.terminal, current.failure_reason
        return current if current.state is JobState.RUNNING else None

    return await eventually(started, timeout=300, interval=0.5)


async def logged_run(server: MlflowServer, run_id: str) -> dict[str, float]:
    def get() -> dict[str, float]:
        url = f"{server.tracking_uri}/api/2.0/mlflow/runs/get?run_id={run_id}"
        with urllib.request.urlopen(url, timeout=30) as response:
            run = json.loads(response.read())["run"]
        return {m["key"]: m["value"] for m in run["data"]["metrics"]}

    return await asyncio.to_thread(get)


async def log_of(app: SchedulerApp, job: Job) -> str:
    return (await app.executor.read_log(job.id, 0)).decode(errors="replace")[-3000:]


async def test_the_example_job_runs_on_ray_logs_to_mlflow_and_a_cancel_stops_it_on_ray(
    scheduler: SchedulerApp, ray_head: RayHead, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "ray-token"
    token_file.write_text(ray_head.token)
    options = {"address": ray_head.dashboard_url, "token_file": str(token_file), "poll_s": "0.3"}
    await scheduler.service.apply_queue_config(ADMIN, queues("ray-cpu", "ray", options))

    done = await run_to_end(scheduler, TRAIN, timeout=600)
    assert done.state is JobState.SUCCEEDED, await log_of(scheduler, done)
    assert done.flavor == "ray-cpu"
    assert done.mlflow_run_id, done.outputs
    assert {"rmse", "r2"} <= set(await logged_run(mlflow_server, done.mlflow_run_id))

    sleeper = await running(scheduler, SLEEP)
    await scheduler.service.cancel(ADMIN, sleeper.id)

    async def cancelled() -> Job | None:
        current = await scheduler.service.get(ADMIN, sleeper.id)
        return current if current.state is JobState.CANCELLED else None

    await eventually(cancelled, timeout=120, interval=0.5)

    def ray_status() -> str:
        request = urllib.request.Request(
            f"{ray_head.dashboard_url}/api/jobs/{submission_id(sleeper)}",
            headers=ray_head.auth_headers,
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["status"])

    assert await asyncio.to_thread(ray_status) == "STOPPED"


async def test_the_example_job_runs_on_slurm_logs_to_mlflow_and_a_cancel_stops_it_on_slurm(
    scheduler: SchedulerApp, slurm: SlurmCluster, mlflow_server: MlflowServer
) -> None:
    options = {"partition": slurm.partition, "slurm_conf": str(slurm.conf_path), "poll_s": "0.3"}
    await scheduler.service.apply_queue_config(ADMIN, queues("hpc", "slurm", options))

    done = await run_to_end(scheduler, TRAIN, timeout=600)
    assert done.state is JobState.SUCCEEDED, await log_of(scheduler, done)
    assert done.flavor == "hpc"
    assert done.mlflow_run_id, done.outputs
    assert {"rmse", "r2"} <= set(await logged_run(mlflow_server, done.mlflow_run_id))

    sleeper = await running(scheduler, SLEEP)
    await scheduler.service.cancel(ADMIN, sleeper.id)

    async def cancelled() -> Job | None:
        current = await scheduler.service.get(ADMIN, sleeper.id)
        return current if current.state is JobState.CANCELLED else None

    await eventually(cancelled, timeout=120, interval=0.5)

    def slurm_state() -> str:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(sleeper.pid)],
            env=slurm.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")

    # Stopped on SLURM too: nothing of it runs or waits there. SLURM records a job that ended
    # on the polite SIGTERM (scancel --signal=TERM) as FAILED, one that needed the final
    # scancel as CANCELLED.
    assert await asyncio.to_thread(slurm_state) in ("CANCELLED", "FAILED")
