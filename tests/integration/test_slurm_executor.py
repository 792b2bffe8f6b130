"""The SLURM executor against a real one-node SLURM cluster (Debian's slurm-wlm, as root).

The cluster (:class:`plinth_common.slurm_cluster.SlurmCluster`) gathers job accounting with
``jobacct_gather/linux`` and kills steps over their memory (``OverMemoryKill``), as clusters
without cgroups do, so that an out-of-memory kill is SLURM's own word here.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from plinth_common.errors import Unavailable
from plinth_common.slurm_cluster import SlurmCluster
from services.scheduler.domain import EndReason, Job, JobSpec, JobState, Resources
from services.scheduler.executors.slurm import SlurmExecutor, SlurmJobRejected

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CAPACITY = Resources(cpu=2, memory_bytes=2 * 1024**3)


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    ok, why = SlurmCluster.available()
    if not ok:
        pytest.skip(f"no SLURM cluster: {why}")
    extra = {
        "JobAcctGatherType": "jobacct_gather/linux",
        "JobAcctGatherFrequency": "task=1",
        "JobAcctGatherParams": "OverMemoryKill",
        "MinJobAge": "120",  # the executor reads the ended job's state from scontrol
        "SelectTypeParameters": "CR_CPU_Memory",  # memory is a consumable: --mem is the limit
    }
    with SlurmCluster(extra_config=extra) as cluster:
        yield cluster


def _executor(cluster: SlurmCluster, jobs_dir: Path, partition: str = "") -> SlurmExecutor:
    return SlurmExecutor(
        jobs_dir,
        capacity=CAPACITY,
        env=cluster.client_env,
        poll_s=0.2,
        partition=partition or cluster.partition,
    )


def _job(
    executor: SlurmExecutor, job_id: str, *argv: str, memory: int = 256 * 1024**2, attempt: int = 1
) -> Job:
    return Job(
        id=job_id,
        spec=JobSpec(
            name="train",
            team="vision",
            entrypoint=argv,
            working_dir=executor.prepare(job_id),
            resources=Resources(cpu=1, memory_bytes=memory),
        ),
        state=JobState.ADMITTED,
        created_at=datetime.now(UTC),
        attempt=attempt,
    )


def _squeue(cluster: SlurmCluster) -> str:
    return subprocess.run(
        ["squeue", "-h", "-o", "%i %T"], env=cluster.env, capture_output=True, text=True, check=True
    ).stdout.strip()


PROGRAM = (
    "import json, os, sys\n"
    "print('tracking', os.environ['MLFLOW_TRACKING_URI'], 'attempt', os.environ['PLINTH_ATTEMPT'])\n"
    "print('cwd', os.getcwd(), 'rank', os.environ['PLINTH_RANK'])\n"
    "print('checkpoint', os.environ['PLINTH_CHECKPOINT_DIR'])\n"
    "print('secret leaked' if 'SCHEDULER_SECRET' in os.environ else 'no leak')\n"
    "json.dump({'accuracy': 0.9}, open(os.environ['PLINTH_OUTPUT_FILE'], 'w'))\n"
    "import time\n"
    "x = b'1' * (60 * 1024 * 1024)  # touched pages: resident\n"
    "time.sleep(3)  # SLURM samples memory once a second (JobAcctGatherFrequency)\n"
    "sys.exit(3)\n"
)


async def test_launch_env_exit_code_outputs_log_and_used_memory(
    slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCHEDULER_SECRET", "s3cret")  # the scheduler's own environment
    executor = _executor(slurm, tmp_path)
    job = _job(executor, "j-env", sys.executable, "-c", PROGRAM)
    handle = await executor.launch(job, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert handle.pid > 0  # the SLURM job id
    status = await asyncio.wait_for(handle.wait(), 60)
    assert (status.exit_code, status.end_reason) == (3, EndReason.EXITED)
    assert status.peak_memory_bytes > 50 * 1024**2, status
    assert await executor.outputs(job) == {"accuracy": "0.9"}
    text = (await executor.read_log("j-env", 0)).decode()
    assert "tracking http://127.0.0.1:5000 attempt 1" in text
    assert f"cwd {job.spec.working_dir} rank 0" in text
    assert f"checkpoint {tmp_path / 'j-env' / 'checkpoint'}" in text
    assert "no leak" in text


async def test_cancel_ends_the_job_on_slurm_and_launch_is_idempotent(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    executor = _executor(slurm, tmp_path)
    program = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), time.sleep(60)))\n"
        "print('up', flush=True)\n"
        "time.sleep(120)\n"
    )
    job = _job(executor, "j-cancel", sys.executable, "-c", program)
    handle = await executor.launch(job, {})
    assert (await executor.launch(job, {})).pid == handle.pid  # no second SLURM job
    for _ in range(300):
        if b"up" in await executor.read_log("j-cancel", 0):
            break
        await asyncio.sleep(0.2)
    await executor.terminate(job, grace_s=1)  # it ignores SIGTERM: killed after 1 s
    began = time.monotonic()
    status = await asyncio.wait_for(handle.wait(), 60)
    assert not status.succeeded
    assert time.monotonic() - began < 15  # the grace period, not SLURM's KillWait (30 s)
    assert str(handle.pid) not in _squeue(slurm).split()
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", str(handle.pid)],
        env=slurm.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # SLURM's record: CANCELLED by the last scancel, or, when the batch step's end reached the
    # controller first (a loaded machine), FAILED by the SIGKILL itself; never a clean exit.
    assert "JobState=CANCELLED" in shown or (
        "JobState=FAILED" in shown and "ExitCode=0:9" in shown
    ), shown
    assert b"got SIGTERM" in await executor.read_log("j-cancel", 0)


async def test_reattach_with_a_new_executor(slurm: SlurmCluster, tmp_path: Path) -> None:
    first = _executor(slurm, tmp_path)
    job = _job(first, "j-again", "sh", "-c", "echo before; sleep 2; echo after", attempt=2)
    handle = await first.launch(job, {})
    # As if the scheduler died between sbatch and recording the id: found by the job's name.
    (tmp_path / "j-again" / "slurm-a2.id").unlink()
    second = _executor(slurm, tmp_path)
    assert await second.reattach(_job(second, "j-never", "true")) is None
    again = await second.reattach(job)
    assert again is not None and again.pid == handle.pid
    status = await asyncio.wait_for(again.wait(), 60)
    assert status.succeeded, status
    text = (await second.read_log("j-again", 0)).decode()
    assert text == "--- attempt 2 ---\nbefore\nafter\n"


async def test_out_of_memory_is_reported_as_oom_killed(slurm: SlurmCluster, tmp_path: Path) -> None:
    executor = _executor(slurm, tmp_path)
    program = "import time\nx = bytearray(400 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])\ntime.sleep(10)\n"
    job = _job(executor, "j-oom", sys.executable, "-c", program, memory=64 * 1024**2)
    status = await asyncio.wait_for((await executor.launch(job, {})).wait(), 90)
    assert status.end_reason is EndReason.OOM_KILLED, status


async def test_refused_and_unreachable(slurm: SlurmCluster, tmp_path: Path) -> None:
    executor = _executor(slurm, tmp_path, partition="nosuch")
    with pytest.raises(SlurmJobRejected, match=r"sbatch refused job j-bad: .*[Pp]artition"):
        await executor.launch(_job(executor, "j-bad", "true"), {})
    down = SlurmExecutor(
        tmp_path,
        capacity=CAPACITY,
        env={"SLURM_CONF": str(tmp_path / "missing.conf")},
        command_timeout_s=3,
    )
    with pytest.raises(Unavailable, match=r"^executor slurm unreachable: "):
        await down.launch(_job(down, "j-down", "true"), {})
