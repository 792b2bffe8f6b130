"""The local executor with real job processes in a temp folder: used resources, checkpoints,
attempts, stopping with a grace period, gangs, and finding the current attempt after a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio

from services.scheduler import shim
from services.scheduler.domain import EndReason, ExitStatus, Job, JobSpec, JobState, Resources
from services.scheduler.executor import RunHandle
from services.scheduler.local_executor import LocalExecutor, ReattachedHandle

MIB = 1024**2
GIB = 1024 * MIB
WAIT_S = 30.0


class Runner:
    """Launches jobs on one executor and stops whatever a test left running."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir
        self.executor = LocalExecutor(jobs_dir, capacity=Resources(cpu=2, memory_bytes=GIB))
        self._started: list[Job] = []

    def job(self, job_id: str, code: str, *, attempt: int = 1, replicas: int = 1) -> Job:
        """A job running ``python -c code`` in its default working directory."""
        spec = JobSpec(
            name="j",
            team="t",
            entrypoint=[sys.executable, "-c", code],
            working_dir=self.executor.prepare(job_id),
            replicas=replicas,
        )
        return Job(
            id=job_id,
            spec=spec,
            state=JobState.RUNNING,
            created_at=datetime.now(UTC),
            attempt=attempt,
        )

    async def launch(self, job: Job, env: dict[str, str] | None = None) -> tuple[Job, RunHandle]:
        """Starts ``job``; returns it with its supervisor's pid recorded (as the service does)."""
        handle = await self.executor.launch(job, env or {"PATH": os.environ["PATH"]})
        started = dataclasses.replace(job, pid=handle.pid)
        self._started.append(started)
        return started, handle

    def log(self, job_id: str) -> str:
        return (self.jobs_dir / job_id / "log").read_text()

    async def until_logged(self, job_id: str, text: str, count: int = 1) -> None:
        """Waits until the job's log holds ``text`` ``count`` times (the job is ready)."""
        deadline = time.monotonic() + WAIT_S
        while self.log(job_id).count(text) < count:
            assert time.monotonic() < deadline, f"never logged {text!r}: {self.log(job_id)!r}"
            await asyncio.sleep(0.02)

    async def stop_all(self) -> None:
        for job in self._started:
            await self.executor.terminate(job, grace_s=0)


@pytest_asyncio.fixture
async def runner(tmp_path: Path) -> AsyncIterator[Runner]:
    jobs = Runner(tmp_path / "jobs")
    yield jobs
    await jobs.stop_all()


async def ended(handle: RunHandle) -> ExitStatus:
    return await asyncio.wait_for(handle.wait(), WAIT_S)


# A job that holds ~120 MiB resident (every page touched) and burns ~0.8 s of cpu.
HUNGRY = """
import time
block = bytearray(120 * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
start = time.process_time()
while time.process_time() - start < 0.8:
    pass
"""


async def test_reports_peak_memory_and_cpu_time_of_the_job(runner: Runner) -> None:
    _, hungry = await runner.launch(runner.job("j-hungry", HUNGRY))
    _, idle = await runner.launch(runner.job("j-idle", "import time; time.sleep(0.2)"))

    big, small = await ended(hungry), await ended(idle)

    assert big.succeeded, big.describe()
    assert big.end_reason is EndReason.EXITED
    assert big.peak_memory_bytes >= 100 * MIB
    assert big.cpu_seconds > 0.5
    # Measured, not a constant: a job that allocates nothing and sleeps shows little of either.
    assert 0 < small.peak_memory_bytes < 60 * MIB
    assert small.cpu_seconds < 0.5
    # What a restarted scheduler reads back carries the same numbers.
    restarted = LocalExecutor(runner.jobs_dir, capacity=runner.executor.capacity)
    again = await restarted.reattach(runner.job("j-hungry", HUNGRY))
    assert again is not None
    assert await ended(again) == big


# Attempt 1 leaves a checkpoint and an output; a later attempt resumes from the checkpoint.
RESUMING = """
import json, os, pathlib
folder = pathlib.Path(os.environ["PLINTH_CHECKPOINT_DIR"])
step = folder / "step"
previous = step.read_text() if step.exists() else "none"
print("attempt", os.environ["PLINTH_ATTEMPT"], "resumes from", previous, "in", folder, flush=True)
step.write_text(os.environ["PLINTH_ATTEMPT"])
if os.environ["PLINTH_ATTEMPT"] == "1":
    pathlib.Path(os.environ["PLINTH_OUTPUT_FILE"]).write_text(json.dumps({"first": "yes"}))
"""


async def test_checkpoint_folder_is_kept_across_attempts_and_each_attempt_is_logged(
    runner: Runner,
) -> None:
    first, handle = await runner.launch(runner.job("j-resume", RESUMING, attempt=1))
    assert (await ended(handle)).succeeded
    assert await runner.executor.outputs(first) == {"first": "yes"}

    second, handle = await runner.launch(runner.job("j-resume", RESUMING, attempt=2))
    assert (await ended(handle)).succeeded

    folder = runner.executor.checkpoint_dir("j-resume")
    assert folder == str(runner.jobs_dir / "j-resume" / "checkpoint")
    assert runner.log("j-resume").splitlines() == [
        f"attempt 1 resumes from none in {folder}",
        "--- attempt 2 ---",
        f"attempt 2 resumes from 1 in {folder}",
    ]
    # Attempt 2 wrote no outputs: attempt 1's are not reported as its own.
    assert await runner.executor.outputs(second) == {}


TRAPS_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
print("ready", flush=True)
time.sleep(60)
"""

IGNORES_TERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


async def test_terminate_lets_a_job_exit_within_its_grace_and_kills_one_that_ignores_it(
    runner: Runner,
) -> None:
    # The executor's own grace is long: the per-call one is what must count.
    runner.executor = LocalExecutor(runner.jobs_dir, capacity=Resources(), kill_grace_s=60)
    polite, polite_handle = await runner.launch(runner.job("j-polite", TRAPS_TERM))
    stubborn, stubborn_handle = await runner.launch(runner.job("j-stubborn", IGNORES_TERM))
    await runner.until_logged("j-polite", "ready")
    await runner.until_logged("j-stubborn", "ready")

    began = time.monotonic()
    await runner.executor.terminate(polite, grace_s=20)
    await runner.executor.terminate(stubborn, grace_s=1.0)
    polite_status = await ended(polite_handle)
    polite_s = time.monotonic() - began
    stubborn_status = await ended(stubborn_handle)
    stubborn_s = time.monotonic() - began

    assert (polite_status.exit_code, polite_status.signal) == (3, 0)
    assert polite_s < 10
    assert stubborn_status.signal == signal.SIGKILL
    assert stubborn_status.describe() == "killed by signal 9 (SIGKILL)"
    assert stubborn_status.end_reason is EndReason.EXITED  # our kill, not the OOM killer's
    assert 1.0 <= stubborn_s < 10


GANG_MEMBER = """
import json, os, pathlib, sys, time
me = {k: os.environ[k] for k in
      ("PLINTH_REPLICA_INDEX", "PLINTH_REPLICAS", "PLINTH_RANK", "PLINTH_WORLD_SIZE")}
pathlib.Path(f"replica-{me['PLINTH_RANK']}.json").write_text(json.dumps(me))
if me["PLINTH_REPLICA_INDEX"] == os.environ.get("FAIL_INDEX"):
    sys.exit(4)
time.sleep(float(os.environ["SLEEP_S"]))
"""


async def test_gang_replicas_see_their_index_and_end_together(runner: Runner) -> None:
    job = runner.job("j-gang", GANG_MEMBER, replicas=3)
    _, handle = await runner.launch(job, {"PATH": os.environ["PATH"], "SLEEP_S": "0.2"})

    status = await ended(handle)

    assert status.succeeded, status.describe()
    seen = [
        json.loads((Path(job.spec.working_dir) / f"replica-{i}.json").read_text()) for i in range(3)
    ]
    assert seen == [
        {
            "PLINTH_REPLICA_INDEX": str(i),
            "PLINTH_REPLICAS": "3",
            "PLINTH_RANK": str(i),
            "PLINTH_WORLD_SIZE": "3",
        }
        for i in range(3)
    ]
    assert status.peak_memory_bytes > 0
    assert status.cpu_seconds > 0


async def test_one_failing_replica_fails_the_gang_and_stops_the_others(runner: Runner) -> None:
    runner.executor = LocalExecutor(runner.jobs_dir, capacity=Resources(), kill_grace_s=2)
    job = runner.job("j-gang-fails", GANG_MEMBER, replicas=3)
    env = {"PATH": os.environ["PATH"], "SLEEP_S": "120", "FAIL_INDEX": "1"}
    began = time.monotonic()
    _, handle = await runner.launch(job, env)

    status = await ended(handle)

    assert time.monotonic() - began < 15  # not the others' 120 s
    assert (status.exit_code, status.signal) == (4, 0)
    assert not status.succeeded
    assert status.describe() == "replica 1 of 3 exited with code 4; the others were stopped"
    replicas = json.loads((runner.jobs_dir / "j-gang-fails" / "status.json").read_text())
    assert [(r["index"], r["signal"]) for r in replicas["replicas"]] == [
        (0, signal.SIGTERM),
        (1, 0),
        (2, signal.SIGTERM),
    ]


WAITS_FOR_GO = """
import os, pathlib, sys, time
print("attempt", os.environ["PLINTH_ATTEMPT"], "running", flush=True)
while not pathlib.Path("go").exists():
    time.sleep(0.05)
sys.exit(5)
"""


async def test_a_restarted_executor_finds_the_current_attempt_not_an_earlier_one(
    runner: Runner,
) -> None:
    _, first = await runner.launch(runner.job("j-again", "import sys; sys.exit(0)", attempt=1))
    assert (await ended(first)).succeeded
    current, _ = await runner.launch(runner.job("j-again", WAITS_FOR_GO, attempt=2))
    await runner.until_logged("j-again", "attempt 2 running")

    # The scheduler restarts: a new executor object over the same folder.
    restarted = LocalExecutor(runner.jobs_dir, capacity=Resources())
    found = await restarted.reattach(current)
    assert isinstance(found, ReattachedHandle)  # running, not attempt 1's finished status
    assert found.pid == current.pid
    assert await restarted.reattach(dataclasses.replace(current, attempt=1)) is None

    Path(current.spec.working_dir, "go").touch()
    status = await ended(found)
    assert status.exit_code == 5
    # Once it ended, the status found is attempt 2's; an attempt never launched finds nothing.
    finished = await restarted.reattach(current)
    assert finished is not None and (await ended(finished)).exit_code == 5
    assert await restarted.reattach(dataclasses.replace(current, attempt=3)) is None


async def test_a_supervisor_killed_outright_is_reported_as_executor_lost(runner: Runner) -> None:
    job, handle = await runner.launch(runner.job("j-lost", WAITS_FOR_GO))
    await runner.until_logged("j-lost", "running")
    assert job.pid is not None

    os.kill(job.pid, signal.SIGKILL)
    status = await ended(handle)

    assert status.end_reason is EndReason.EXECUTOR_LOST
    assert not status.succeeded
    assert status.describe() == "the job's supervisor died (signal 9)"
    Path(job.spec.working_dir, "go").touch()  # let the orphaned job end


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (ExitStatus(exit_code=3), "exit code 3"),
        (
            ExitStatus(exit_code=0, signal=9, end_reason=EndReason.OOM_KILLED),
            "killed for running out of memory (SIGKILL)",
        ),
        (ExitStatus(exit_code=0, end_reason=EndReason.PREEMPTED), "preempted (exit code 0)"),
    ],
)
def test_exit_status_words(status: ExitStatus, text: str) -> None:
    assert status.describe() == text
    assert not status.succeeded


@pytest.mark.parametrize(
    ("signum", "killed_by_shim", "oom_kills", "expected"),
    [
        (signal.SIGKILL, False, (7, 8), EndReason.OOM_KILLED),
        (signal.SIGKILL, True, (7, 8), EndReason.EXITED),  # the grace ran out: our kill
        (signal.SIGKILL, False, (7, 7), EndReason.EXITED),  # someone's kill -9
        (signal.SIGKILL, False, (-1, -1), EndReason.EXITED),  # no counter to read
        (signal.SIGSEGV, False, (7, 8), EndReason.EXITED),
    ],
)
def test_an_unexplained_sigkill_during_an_oom_kill_is_reported_as_out_of_memory(
    signum: int, killed_by_shim: bool, oom_kills: tuple[int, int], expected: EndReason
) -> None:
    got = shim.end_reason(signum, killed_by_shim=killed_by_shim, oom_kills=oom_kills)
    assert EndReason(got) is expected
