"""The job life cycle's rules and FIFO admission, without a store or an executor."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth_common.errors import FailedPrecondition, InvalidArgument
from services.scheduler.domain import (
    ExitStatus,
    Job,
    JobSpec,
    JobState,
    Resources,
    admissible,
    free_capacity,
)
from services.scheduler.servicer import state_from_proto

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job(job_id: str = "j-1", *, cpu: float = 1.0, state: JobState = JobState.QUEUED) -> Job:
    spec = JobSpec(name="t", team="ml", entrypoint=("true",), resources=Resources(cpu=cpu))
    return Job(id=job_id, spec=spec, state=state, created_at=NOW)


def test_a_job_moves_queued_admitted_running_succeeded() -> None:
    running = job().admit(now=NOW).start(pid=42, now=NOW)
    assert running.state is JobState.RUNNING and running.pid == 42
    done = running.finish(ExitStatus(exit_code=0), outputs={"mlflow_run_id": "r1"}, now=NOW)
    assert done.state is JobState.SUCCEEDED and done.mlflow_run_id == "r1"
    assert done.state.terminal and not done.state.active


def test_a_cancel_request_wins_over_the_exit_code() -> None:
    running = job().admit(now=NOW).start(pid=42, now=NOW).request_cancel()
    done = running.finish(ExitStatus(exit_code=0, signal=15), outputs={}, now=NOW)
    assert done.state is JobState.CANCELLED and done.signal == 15


@pytest.mark.parametrize(
    "step",
    [
        lambda j: j.start(pid=1, now=NOW),  # not admitted yet
        lambda j: j.finish(ExitStatus(exit_code=0), outputs={}, now=NOW),  # never ran
        lambda j: j.request_cancel(),  # queued jobs are cancelled outright
        lambda j: j.admit(now=NOW).admit(now=NOW),
        lambda j: j.cancel_queued(now=NOW).requeue(),
    ],
)
def test_transitions_out_of_order_are_refused(step: Callable[[Job], Job]) -> None:
    with pytest.raises(FailedPrecondition):
        step(job())


def test_admission_is_strict_fifo_within_what_is_free() -> None:
    capacity = Resources(cpu=4.0, memory_bytes=10**9)
    active = [job("j-a", cpu=1.5, state=JobState.RUNNING)]
    free = free_capacity(capacity, active)
    queue = [job("j-1", cpu=1.0), job("j-2", cpu=1.0), job("j-3", cpu=2.0), job("j-4", cpu=0.1)]
    assert [j.id for j in admissible(queue, free)] == ["j-1", "j-2"]


def test_an_unknown_state_number_is_an_invalid_state() -> None:
    assert state_from_proto(pb.JOB_STATE_UNSPECIFIED) is None
    assert state_from_proto(pb.JOB_STATE_RUNNING) is JobState.RUNNING
    with pytest.raises(InvalidArgument) as caught:
        state_from_proto(99)
    assert caught.value.field == "state"
