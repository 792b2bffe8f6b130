"""Chaos: a service of ``make run`` killed with SIGKILL comes back by itself, and nothing it was
doing is lost or done twice.

- the scheduler, while two jobs run and two wait for capacity: the supervisor restarts it, the
  running jobs are re-attached (they succeed, not LOST), the queued ones run, and the stream
  holds exactly one ``plinth.job.finished`` per job; ``plinth status`` shows the restart; when
  it then keeps crashing, the start limit leaves it down (reported, no tight loop);
- the registry, between a job's MLflow run and its registration (the job itself kills the
  registry as its last act, so the ``job.finished`` event arrives while the registry is down):
  the MLflow server it had started dies with it (nothing holds its port), the restarted
  registry starts its own on the same port and registers the job's model exactly once.

Each test prints the time to recover, the events lost and the duplicate effects.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest

from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.auth import bearer_interceptors
from plinth_common.devstack import LocalPlatform, RestartPolicy
from tests.chaos.conftest import (
    StartPlatform,
    consumers_drained,
    event_counts,
    kill9,
    platform_processes,
    port_holders,
    wait_restarted,
)
from tests.helpers import eventually

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="session")]
REPO = Path(__file__).resolve().parents[2]
# Stated bounds: the supervisor's first restart waits 0.5 s; the scheduler starts in seconds,
# the registry waits for its MLflow server (whose own start-up timeout is 90 s).
RECOVERY_BOUND_S = 60.0
REGISTRY_RECOVERY_BOUND_S = 90.0
JOBS_BOUND_S = 60.0
FINISHED = "plinth.job.finished"
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def _report(what: str, *, recovered_s: float, lost: int, duplicates: int) -> None:
    print(
        f"\nCHAOS {what}: recovered in {recovered_s:.1f} s; events lost: {lost}; "
        f"duplicate effects: {duplicates}",
        flush=True,
    )


async def _jobs(stub: scheduler_pb2_grpc.SchedulerServiceStub, ids: list[str]) -> list[pb.Job]:
    return [(await stub.GetJob(pb.GetJobRequest(job_id=i), timeout=5)) for i in ids]


async def test_scheduler_killed_while_jobs_run_and_queue_heals_without_losing_a_job(
    chaos_platform: StartPlatform,
) -> None:
    # Room for two one-core jobs: of four, two run and two queue.
    platform = await chaos_platform(
        services=("scheduler", "gateway"),
        env={"PLINTH_SCHEDULER_CPU": "2"},
        policy=RestartPolicy(burst=3),
    )
    async with grpc.aio.insecure_channel(
        platform.address("gateway"), interceptors=bearer_interceptors(platform.admin_key)
    ) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        ids = []
        for index in range(4):
            spec = pb.JobSpec(
                name=f"chaos-sleep-{index}",
                team="chaos",
                entrypoint=[sys.executable, "-c", "import time; time.sleep(5); print('done')"],
                resources=pb.Resources(cpu=1),
            )
            ids.append((await stub.SubmitJob(pb.SubmitJobRequest(spec=spec))).job.id)

        async def two_running_two_queued() -> list[pb.Job] | None:
            jobs = await _jobs(stub, ids)
            states = sorted(j.state for j in jobs)
            wanted = [pb.JOB_STATE_QUEUED] * 2 + [pb.JOB_STATE_RUNNING] * 2
            return jobs if states == wanted else None

        before = await eventually(two_running_two_queued, timeout=20)
        running = [j.id for j in before if j.state == pb.JOB_STATE_RUNNING]
        kill9(platform, "scheduler")
        # While it is down (the first restart waits 0.5 s), a call says what is unavailable.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetJob(pb.GetJobRequest(job_id=ids[0]), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "scheduler" in (refused.value.details() or ""), refused.value.details()
        print(f"\nwhile the scheduler is down: UNAVAILABLE: {refused.value.details()}", flush=True)
        recovered_s = await wait_restarted(
            platform, "scheduler", restarts=1, timeout=RECOVERY_BOUND_S
        )

        async def all_terminal() -> list[pb.Job] | None:
            try:
                jobs = await _jobs(stub, ids)
            except grpc.aio.AioRpcError:
                return None
            return jobs if all(j.state in TERMINAL for j in jobs) else None

        done = await eventually(all_terminal, timeout=JOBS_BOUND_S, interval=0.2)

    failed = {j.id: (j.state, j.failure_reason) for j in done if j.state != pb.JOB_STATE_SUCCEEDED}
    assert not failed, f"jobs that did not succeed (re-attached: {running}): {failed}"

    async def every_job_finished_once_published() -> bool:
        counts = await event_counts(platform.nats_url, FINISHED)
        return all(counts[i] >= 1 for i in ids)

    # The outbox publishes right after the commit that ended each job: a bounded wait.
    await _eventually_true(every_job_finished_once_published, timeout=15)
    counts = await event_counts(platform.nats_url, FINISHED)
    lost = sum(1 for i in ids if counts[i] == 0)
    duplicates = sum(max(counts[i] - 1, 0) for i in ids)
    _report("scheduler killed", recovered_s=recovered_s, lost=lost, duplicates=duplicates)
    assert (lost, duplicates) == (0, 0), dict(counts)
    assert recovered_s < RECOVERY_BOUND_S

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{platform.http_url}/healthz") as page,
    ):
        health = await page.json()
    supervised = health["supervisor"]["services"]["scheduler"]
    assert (supervised["restarts"], supervised["state"]) == (1, "running"), health

    # The restart shows in `plinth status` (through the gateway's /healthz); the services this
    # platform did not start make it DEGRADED, hence exit code 1.
    shown = await asyncio.to_thread(_plinth_status, platform)
    report = json.loads(shown.stdout)
    assert (shown.returncode, report["status"]) == (1, "DEGRADED"), shown.stdout + shown.stderr
    down = {n for n, row in report["services"].items() if row["health"] != "SERVING"}
    assert down == {"registry", "features", "serving"}
    scheduler = report["services"]["scheduler"]
    assert (scheduler["restarts"], scheduler["state"]) == (1, "running")
    assert scheduler["last_exit"] == "was killed by SIGKILL"

    # Then it keeps crashing (a setting it refuses at start-up): two more restarts with a
    # growing pause, then the start limit (3 here) leaves it down instead of a tight loop.
    platform.config.env["PLINTH_SCHEDULER_CPU"] = "not-a-number"
    kill9(platform, "scheduler")

    async def given_up() -> bool:
        status = platform.status["scheduler"]
        return status.state == "failed"

    await _eventually_true(given_up, timeout=RECOVERY_BOUND_S)
    status = platform.status["scheduler"]
    assert status.restarts == 3 and status.last_exit == "exited with code 1", status
    shown = await asyncio.to_thread(_plinth_status, platform)
    assert shown.returncode == 1
    assert json.loads(shown.stdout)["services"]["scheduler"]["state"] == "failed"


async def test_registry_killed_before_registration_registers_the_version_exactly_once(
    chaos_platform: StartPlatform,
) -> None:
    platform = await chaos_platform(services=("registry", "scheduler", "gateway"))
    mlflow_port = platform.config.mlflow_port
    old_mlflow = set(port_holders(mlflow_port))
    assert old_mlflow, "the registry's MLflow should listen on its port"
    registry_pid = platform.processes["registry"].pid
    model = "chaos-diabetes"
    # The job logs its run and model to MLflow, then kills the registry (and so its MLflow)
    # as its last act: job.finished is published while the registry is down.
    script = (
        f'"{sys.executable}" examples/train_diabetes.py --n-estimators 5 '
        f'&& kill -9 "$CHAOS_REGISTRY_PID"'
    )
    async with grpc.aio.insecure_channel(
        platform.address("gateway"), interceptors=bearer_interceptors(platform.admin_key)
    ) as channel:
        jobs = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        spec = pb.JobSpec(
            name="chaos-train",
            team="chaos",
            entrypoint=["/bin/sh", "-c", script],
            working_dir=str(REPO),
            env={"CHAOS_REGISTRY_PID": str(registry_pid)},
            register_as=model,
        )
        job = (await jobs.SubmitJob(pb.SubmitJobRequest(spec=spec))).job

        async def registry_died() -> bool:
            return not platform.processes["registry"].alive

        await _eventually_true(registry_died, timeout=JOBS_BOUND_S)
        killed_at = time.monotonic()
        recovered_s = await wait_restarted(
            platform, "registry", restarts=1, timeout=REGISTRY_RECOVERY_BOUND_S
        )
        finished = await jobs.GetJob(pb.GetJobRequest(job_id=job.id))
        assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.failure_reason

        async def registered() -> list[registry_pb2.ModelVersion] | None:
            try:
                reply = await registry.ListModelVersions(
                    registry_pb2.ListModelVersionsRequest(name=model), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    return None
                raise
            return [v for v in reply.versions if v.tags.get("plinth.job_id") == job.id] or None

        # Under a loaded suite a fresh MLflow can take tens of seconds more to serve its first
        # registration: bounded by the registry recovery bound, not a tighter guess.
        await eventually(registered, timeout=REGISTRY_RECOVERY_BOUND_S, interval=0.2)
        registered_s = time.monotonic() - killed_at

        async def drained() -> bool:
            return await consumers_drained(platform.nats_url)

        # Every durable consumer has acked everything: no redelivery can register it again.
        await _eventually_true(drained, timeout=15)
        versions = await registered() or []

    # No orphan: the old MLflow died with the registry; the new registry's own holds the port.
    still_running = [pid for pid in old_mlflow if _alive(pid)]
    new_mlflow = set(port_holders(mlflow_port))
    new_registry = platform.processes["registry"].pid
    assert not still_running, f"the killed registry's MLflow still runs: {still_running}"
    assert new_mlflow and not new_mlflow & old_mlflow
    assert new_registry is not None
    assert all(_descends_from(pid, new_registry) for pid in new_mlflow), new_mlflow
    events = await event_counts(platform.nats_url, FINISHED)
    lost = 0 if versions else 1
    duplicates = max(len(versions) - 1, 0) + max(events[job.id] - 1, 0)
    _report(
        f"registry killed (registered {registered_s:.1f} s after the kill)",
        recovered_s=recovered_s,
        lost=lost,
        duplicates=duplicates,
    )
    assert len(versions) == 1, [(v.version, dict(v.tags)) for v in versions]
    assert events[job.id] == 1
    assert recovered_s < REGISTRY_RECOVERY_BOUND_S
    assert platform_processes(platform.config.data_dir)  # still up: stop() is the fixture's


async def _eventually_true(probe: Callable[[], Awaitable[bool]], *, timeout: float) -> None:
    async def truthy() -> bool:
        return await probe()

    await eventually(truthy, timeout=timeout, interval=0.1)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return False
        pid = int(stat[stat.rfind(b")") + 2 :].split()[1])
    return False


def _plinth_status(platform: LocalPlatform) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PLINTH_GATEWAY_HTTP": platform.http_url,
        "PLINTH_DATA_DIR": str(platform.config.data_dir),
    }
    return subprocess.run(
        [str(Path(sys.executable).with_name("plinth")), "status", "-o", "json"],
        env=env,
        check=False,  # asserted by the caller
        capture_output=True,
        text=True,
        timeout=30,
    )
