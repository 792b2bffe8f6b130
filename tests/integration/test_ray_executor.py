"""The Ray executor against a real Ray head (``ray start --head``, token auth, ephemeral ports).

One head for the module (it takes 10 to 60 s to start on a busy 2-core machine); each test
submits one or two short jobs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from plinth_common.errors import Unavailable
from plinth_common.net import free_tcp_port
from plinth_common.ray_head import RayHead
from services.scheduler.domain import EndReason, Job, JobSpec, JobState, Resources
from services.scheduler.executors.ray import RayExecutor

# Generous: the first test also waits for the head, which takes minutes on a loaded machine.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CAPACITY = Resources(cpu=2, memory_bytes=2 * 1024**3)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    ok, why = RayHead.available()
    if not ok:
        pytest.skip(f"no Ray head: {why}")
    with RayHead(num_cpus=2) as head:
        yield head


def _executor(head: RayHead, jobs_dir: Path, **kwargs: object) -> RayExecutor:
    return RayExecutor(
        head.dashboard_url,
        jobs_dir,
        capacity=CAPACITY,
        token=head.token,
        poll_s=0.3,
        kill_grace_s=5,
        **kwargs,  # type: ignore[arg-type]
    )


def _job(executor: RayExecutor, job_id: str, *argv: str, attempt: int = 1) -> Job:
    work = executor.prepare(job_id)
    return Job(
        id=job_id,
        spec=JobSpec(
            name="train",
            team="vision",
            entrypoint=argv,
            working_dir=work,
            resources=Resources(cpu=1, memory_bytes=256 * 1024**2),
        ),
        state=JobState.ADMITTED,
        created_at=datetime.now(UTC),
        attempt=attempt,
    )


def _ray_status(head: RayHead, submission_id: str) -> str:
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/jobs/{submission_id}", headers=head.auth_headers
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["status"])


def _ray_delete(head: RayHead, submission_id: str) -> None:
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/jobs/{submission_id}", headers=head.auth_headers, method="DELETE"
    )
    urllib.request.urlopen(request, timeout=10).close()


PRINT_ENV = (
    "import json, os, sys\n"
    "print('tracking', os.environ['MLFLOW_TRACKING_URI'], 'attempt', os.environ['PLINTH_ATTEMPT'])\n"
    "print('cwd', os.getcwd())\n"
    "print('checkpoint', os.environ['PLINTH_CHECKPOINT_DIR'])\n"
    "json.dump({'accuracy': 0.9}, open(os.environ['PLINTH_OUTPUT_FILE'], 'w'))\n"
    "sys.exit(3)\n"
)


async def test_launch_env_exit_code_outputs_and_logs_kept_after_ray_forgets(
    ray_head: RayHead, tmp_path: Path
) -> None:
    executor = _executor(ray_head, tmp_path)
    job = _job(executor, "j-env", sys.executable, "-c", PRINT_ENV)
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "PATH": "/usr/bin:/bin"}
    try:
        status = await asyncio.wait_for((await executor.launch(job, env)).wait(), 120)
        assert status.exit_code == 3
        assert status.end_reason is EndReason.EXITED
        assert await executor.outputs(job) == {"accuracy": "0.9"}
        _ray_delete(ray_head, "j-env-a1")  # Ray forgets the job and its logs
        text = (await executor.read_log("j-env", 0)).decode()
        assert "tracking http://127.0.0.1:5000 attempt 1" in text
        assert f"cwd {job.spec.working_dir}" in text
        assert f"checkpoint {tmp_path / 'j-env' / 'checkpoint'}" in text
    finally:
        await executor.aclose()


async def test_cancel_stops_the_job_on_ray_and_a_second_launch_is_not_a_second_job(
    ray_head: RayHead, tmp_path: Path
) -> None:
    executor = _executor(ray_head, tmp_path)
    program = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(0)))\n"
        "print('up', flush=True)\n"
        "time.sleep(120)\n"
    )
    job = _job(executor, "j-cancel", sys.executable, "-c", program)
    try:
        handle = await executor.launch(job, {})
        again = await executor.launch(job, {})  # a launch repeated after a crash
        assert again.submission_id == handle.submission_id
        # The scheduler waits on every attempt it runs; that wait copies the log meanwhile.
        waiter = asyncio.ensure_future(handle.wait())
        for _ in range(400):  # Ray's own lines quote the entrypoint: look for whole lines
            if "up" in (await executor.read_log("j-cancel", 0)).decode().splitlines():
                break
            await asyncio.sleep(0.3)
        else:
            pytest.fail("the job's first line never reached its log")
        await executor.terminate(job, grace_s=5)
        status = await asyncio.wait_for(waiter, 60)
        assert not status.succeeded
        assert _ray_status(ray_head, "j-cancel-a1") == "STOPPED"
        text = (await executor.read_log("j-cancel", 0)).decode()
        assert "got SIGTERM" in text.splitlines()
        assert text.splitlines().count("up") == 1  # the log is copied once, not per poll
    finally:
        await executor.aclose()


async def test_reattach_with_a_new_executor_keeps_the_log_whole(
    ray_head: RayHead, tmp_path: Path
) -> None:
    first = _executor(ray_head, tmp_path)
    program = (
        "import time\nprint('before', flush=True)\ntime.sleep(4)\nprint('after', flush=True)\n"
    )
    job = _job(first, "j-reattach", sys.executable, "-c", program, attempt=2)
    handle = await first.launch(job, {})
    waiter = asyncio.ensure_future(handle.wait())
    for _ in range(400):
        if "before" in (await first.read_log("j-reattach", 0)).decode().splitlines():
            break
        await asyncio.sleep(0.3)
    waiter.cancel()  # the scheduler goes away mid-run
    await first.aclose()
    second = _executor(ray_head, tmp_path)
    try:
        assert await second.reattach(_job(second, "j-unknown", "true")) is None
        again = await second.reattach(job)
        assert again is not None
        status = await asyncio.wait_for(again.wait(), 60)
        assert status.succeeded
        text = (await second.read_log("j-reattach", 0)).decode()
        assert text.startswith("--- attempt 2 ---\n")
        lines = text.splitlines()  # Ray's own lines quote the entrypoint: count whole lines
        assert lines.count("before") == 1 and lines.count("after") == 1
    finally:
        await second.aclose()


async def test_uploaded_working_dir(ray_head: RayHead, tmp_path: Path) -> None:
    executor = _executor(ray_head, tmp_path, working_dir="upload")
    job = _job(executor, "j-upload", "cat", "data.txt")
    Path(job.spec.working_dir, "data.txt").write_text("shipped to ray\n")
    try:
        status = await asyncio.wait_for((await executor.launch(job, {})).wait(), 120)
        assert status.succeeded, status
        assert b"shipped to ray" in await executor.read_log("j-upload", 0)
    finally:
        await executor.aclose()


async def test_unreachable_cluster_is_unavailable_naming_the_cause(tmp_path: Path) -> None:
    executor = RayExecutor(
        f"http://127.0.0.1:{free_tcp_port()}", tmp_path, capacity=CAPACITY, request_timeout_s=2
    )
    job = _job(executor, "j-down", "true")
    try:
        with pytest.raises(Unavailable, match=r"^executor ray unreachable: "):
            await executor.launch(job, {})
    finally:
        await executor.aclose()
