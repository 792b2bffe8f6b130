"""The Ray and SLURM executors' pure parts (state mapping, flags, scripts) and the flavor router.

The engines themselves are exercised in tests/integration/test_{ray,slurm}_executor.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from plinth_common.errors import InvalidArgument
from services.scheduler.domain import EndReason, ExitStatus, Job, JobSpec, JobState, Resources
from services.scheduler.executors import ray, slurm
from services.scheduler.executors.router import FlavorRouter, build_executor
from services.scheduler.local_executor import LocalExecutor
from services.scheduler.queueing.model import ResourceFlavor


def _job(flavor: str = "", **spec: object) -> Job:
    return Job(
        id="j1",
        spec=JobSpec(name="train", team="vision", entrypoint=("python", "train.py"), **spec),  # type: ignore[arg-type]
        state=JobState.ADMITTED,
        created_at=datetime.now(UTC),
        flavor=flavor,
        attempt=2,
    )


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"status": "SUCCEEDED"}, (0, 0, EndReason.EXITED, True)),
        (
            {
                "status": "FAILED",
                "error_type": "JOB_ENTRYPOINT_COMMAND_ERROR",
                "driver_exit_code": 3,
            },
            (3, 0, EndReason.EXITED, False),
        ),
        (
            {
                "status": "FAILED",
                "error_type": "JOB_ENTRYPOINT_COMMAND_ERROR",
                "driver_exit_code": -9,
            },
            (-1, 9, EndReason.EXITED, False),
        ),
        (
            {
                "status": "FAILED",
                "error_type": "RUNTIME_ENV_SETUP_FAILURE",
                "message": "pip failed",
            },
            (-1, 0, EndReason.LAUNCH_FAILED, False),
        ),
        (
            {"status": "FAILED", "error_type": "JOB_SUPERVISOR_ACTOR_DIED", "message": "node died"},
            (-1, 0, EndReason.EXECUTOR_LOST, False),
        ),
        ({"status": "STOPPED"}, (-1, 15, EndReason.EXITED, False)),
    ],
)
def test_ray_states_map_to_exit_statuses(
    info: Mapping[str, object], expected: tuple[int, int, EndReason, bool]
) -> None:
    status = ray._exit_status(info)
    assert (status.exit_code, status.signal, status.end_reason, status.succeeded) == expected


def test_ray_engine_message_is_the_line_that_says_why() -> None:
    traceback = "Traceback (most recent call last):\n  File x\nValueError: bad runtime_env\n.\n"
    assert ray._engine_message(traceback) == "ValueError: bad runtime_env"


@pytest.mark.parametrize(
    ("state", "exit_code", "end_reason"),
    [
        ("COMPLETED", "0:0", EndReason.EXITED),
        ("FAILED", "3:0", EndReason.EXITED),
        ("OUT_OF_MEMORY", "0:125", EndReason.OOM_KILLED),
        ("PREEMPTED", "0:15", EndReason.PREEMPTED),
        ("TIMEOUT", "0:15", EndReason.RUN_TIME_EXCEEDED),
        ("NODE_FAIL", "0:0", EndReason.EXECUTOR_LOST),
    ],
)
def test_slurm_states_map_to_end_reasons(state: str, exit_code: str, end_reason: EndReason) -> None:
    account = {"MaxRSS": str(300 * 1024**2), "TotalCPU": "01:02.500"}
    status = slurm._exit_status({"JobState": state, "ExitCode": exit_code}, account, 0)
    assert status.end_reason is end_reason
    assert status.succeeded is (state == "COMPLETED")
    assert status.peak_memory_bytes == 300 * 1024**2
    assert status.cpu_seconds == pytest.approx(62.5)


def test_slurm_units() -> None:
    assert slurm._bytes("123456K") == 123456 * 1024
    assert slurm._bytes("") == 0
    assert slurm._cpu_seconds("1-00:00:01") == 86401
    assert slurm._cpu_seconds("00:01.250") == pytest.approx(1.25)


def test_slurm_flags_and_gang_script() -> None:
    executor = slurm.SlurmExecutor(Path("/tmp"), capacity=Resources(), partition="gpu", qos="hi")
    job = _job(
        resources=Resources(cpu=1.5, memory_bytes=3 * 1024**3, gpu=2),
        replicas=4,
        max_run_time_s=3725,
    )
    assert executor._resource_flags(job) == [
        "--cpus-per-task=2",
        "--mem=3072M",
        "--gres=gpu:2",
        "--nodes=4",
        "--ntasks=4",
        "--ntasks-per-node=1",
        "--time=1:02:05",
        "--partition=gpu",
        "--qos=hi",
    ]
    script = slurm._script(job)
    assert "exec srun --kill-on-bad-exit=1 sh -c" in script
    assert script.rstrip().endswith("plinth python train.py")
    assert slurm._job_name(job) == "plinth-j1-a2"


class _Named(LocalExecutor):
    def __init__(self, name: str, jobs_dir: Path) -> None:
        super().__init__(jobs_dir, capacity=Resources(cpu=4))
        self.name = name

    async def outputs(self, job: Job) -> dict[str, str]:
        return {"by": self.name}


async def test_router_dispatches_by_flavor_and_names_an_unknown_one(tmp_path: Path) -> None:
    local, gpu = _Named("local", tmp_path), _Named("gpu", tmp_path)
    router = FlavorRouter(local, {"cpu": local, "gpu-a100": gpu})
    assert await router.outputs(_job("gpu-a100")) == {"by": "gpu"}
    assert await router.outputs(_job("cpu")) == {"by": "local"}
    assert await router.outputs(_job("")) == {"by": "local"}
    assert router.capacity == Resources(cpu=4)
    # A flavor dropped by a later configuration keeps its executor for its jobs; one unknown
    # here (dropped before a restart) goes to the default, which finds nothing of other engines.
    router.update({"cpu": local})
    assert await router.outputs(_job("gpu-a100")) == {"by": "gpu"}
    assert await router.outputs(_job("spot")) == {"by": "local"}


def test_build_executor_refuses_an_unknown_kind_and_bad_options(tmp_path: Path) -> None:
    local = LocalExecutor(tmp_path, capacity=Resources(cpu=1))
    assert build_executor(ResourceFlavor(name="cpu"), local=local, jobs_dir=tmp_path) is local
    built = build_executor(
        ResourceFlavor(name="r", executor="ray", executor_options={"address": "http://h:8265"}),
        local=local,
        jobs_dir=tmp_path,
    )
    assert isinstance(built, ray.RayExecutor)
    with pytest.raises(InvalidArgument, match="unknown executor 'k8s'"):
        build_executor(ResourceFlavor(name="x", executor="k8s"), local=local, jobs_dir=tmp_path)
    with pytest.raises(InvalidArgument, match="Ray dashboard"):
        build_executor(ResourceFlavor(name="r", executor="ray"), local=local, jobs_dir=tmp_path)


def test_slurmstepd_memory_kill_in_the_attempts_log_is_oom(tmp_path: Path) -> None:
    executor = slurm.SlurmExecutor(tmp_path, capacity=Resources())
    job = _job()
    executor.prepare(job.id)
    log = executor.log_path(job.id)
    earlier = b"slurmstepd-n1: error: StepId=1.batch exceeded memory limit (9 > 8), being killed\n"
    log.write_bytes(earlier)
    (tmp_path / job.id / "slurm-a2.log").write_text(f"{len(earlier)}\n")
    killed = ExitStatus(exit_code=0, signal=9)
    assert (
        executor._memory_kill(job, killed) == killed
    )  # an earlier attempt's kill is not this one's
    with open(log, "ab") as handle:
        handle.write(
            b"slurmstepd-n1: error: StepId=2.batch exceeded memory limit (178737152 > 67108864), "
            b"being killed\n"
        )
    status = executor._memory_kill(job, killed)
    assert status.end_reason is EndReason.OOM_KILLED
    assert status.peak_memory_bytes == 178737152
    assert status.describe() == "slurm: killed for exceeding its memory limit (170.5 MiB used)"
