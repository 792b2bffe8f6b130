"""The job life cycle's rules, retries and right-sizing, without a store or an executor."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth_common.errors import FailedPrecondition, InvalidArgument
from services.scheduler.domain import (
    Attempt,
    EndReason,
    ExitStatus,
    FailureKind,
    Job,
    JobSpec,
    JobState,
    Outcome,
    Resources,
    RetryPolicy,
    judge,
    right_sizing_hint,
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


def running(retry: RetryPolicy | None = None, **fields: Any) -> Job:
    spec = JobSpec(
        name="t",
        team="ml",
        entrypoint=("true",),
        resources=Resources(cpu=1.0),
        retry=retry or RetryPolicy(),
    )
    started = Job(id="j-1", spec=spec, state=JobState.QUEUED, created_at=NOW)
    return dataclasses.replace(started.admit(now=NOW).start(pid=1, now=NOW), **fields)


def test_a_non_zero_exit_is_a_user_failure_not_retried_by_default() -> None:
    verdict = judge(running(), ExitStatus(exit_code=3))
    assert verdict.outcome is Outcome.FAILED and verdict.failure_kind is FailureKind.USER
    assert verdict.message == "exit code 3"


def test_user_and_infrastructure_budgets_are_separate_with_exponential_backoff() -> None:
    policy = RetryPolicy(
        user_failure_limit=2, infrastructure_failure_limit=1, backoff_initial_s=10, backoff_max_s=25
    )
    lost = ExitStatus(exit_code=-1, end_reason=EndReason.EXECUTOR_LOST)
    first = judge(running(policy), ExitStatus(exit_code=1))
    assert (first.outcome, first.failure_kind, first.backoff_s) == (
        Outcome.RETRYING,
        FailureKind.USER,
        10,
    )
    second = judge(running(policy, user_failures=1), ExitStatus(exit_code=1))
    assert (second.outcome, second.backoff_s) == (Outcome.RETRYING, 20)
    # Doubling, capped at backoff_max.
    assert RetryPolicy(backoff_initial_s=10, backoff_max_s=25).backoff_s(3) == 25
    spent = judge(running(policy, user_failures=2), ExitStatus(exit_code=1))
    assert (
        spent.outcome is Outcome.FAILED and "user failure retries used up (2 of 2)" in spent.message
    )
    # User failures spent: an infrastructure failure still has its own budget.
    infra = judge(running(policy, user_failures=2), lost)
    assert (infra.outcome, infra.failure_kind) == (Outcome.RETRYING, FailureKind.INFRASTRUCTURE)
    infra_spent = judge(running(policy, infrastructure_failures=1), lost)
    assert infra_spent.outcome is Outcome.FAILED


def test_a_preempted_attempt_is_requeued_and_counts_against_no_budget() -> None:
    job = running(RetryPolicy(user_failure_limit=0, infrastructure_failure_limit=0))
    job = job.request_stop(EndReason.PREEMPTED, "preempted by job j-2")
    # Even an exit 0 within the grace period (a job that checkpointed and left) is requeued.
    for status in (ExitStatus(exit_code=0), ExitStatus(exit_code=-1, signal=9)):
        verdict = judge(job, status)
        assert verdict.outcome is Outcome.REQUEUED and verdict.end_reason is EndReason.PREEMPTED
    queued = job.requeue_after(judge(job, ExitStatus(exit_code=0)), now=NOW)
    assert queued.state is JobState.QUEUED and queued.attempt == 2
    assert queued.queue_order == job.queue_order and queued.stop_reason is None
    assert (queued.user_failures, queued.infrastructure_failures) == (0, 0)


def test_exceeding_the_maximum_run_time_is_a_user_failure_with_that_reason() -> None:
    job = running().request_stop(
        EndReason.RUN_TIME_EXCEEDED, "exceeded its maximum run time of 60 s"
    )
    verdict = judge(job, ExitStatus(exit_code=-1, signal=15))
    assert verdict.outcome is Outcome.FAILED and verdict.failure_kind is FailureKind.USER
    done = job.finish(ExitStatus(exit_code=-1, signal=15), outputs={}, now=NOW)
    assert done.failure_reason == "exceeded its maximum run time of 60 s"


def test_a_retry_queues_by_its_not_before() -> None:
    job = running(RetryPolicy(user_failure_limit=1))
    verdict = judge(job, ExitStatus(exit_code=1))
    later = datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC)
    queued = job.requeue_after(verdict, now=NOW, not_before=later)
    assert queued.queue_order == later.timestamp() and queued.user_failures == 1


def _measured(**fields: object) -> Attempt:
    base: dict[str, object] = {
        "number": 1,
        "end_reason": EndReason.EXITED,
        "started_at": NOW,
        "finished_at": datetime(2026, 1, 1, 0, 1, 40, tzinfo=UTC),  # 100 s
        "requested": Resources(cpu=4, memory_bytes=8 * 1024**3),
    }
    return Attempt(**{**base, **fields})  # type: ignore[arg-type]


def test_right_sizing_hint_when_far_less_was_used_than_asked() -> None:
    hint = right_sizing_hint([_measured(peak_memory_bytes=900 * 1024**2, cpu_seconds=380)])
    assert hint == "asked for 8 GiB, peaked at 900 MiB: request 1.5 GiB"
    cpu = right_sizing_hint([_measured(peak_memory_bytes=7 * 1024**3, cpu_seconds=50)])
    assert cpu == "asked for 4 cpu, used 0.50 on average: request 0.8 cpu"
    assert right_sizing_hint([_measured(peak_memory_bytes=7 * 1024**3, cpu_seconds=390)]) == ""
    assert right_sizing_hint([_measured()]) == ""  # nothing measured


def test_an_unknown_state_number_is_an_invalid_state() -> None:
    assert state_from_proto(pb.JOB_STATE_UNSPECIFIED) is None
    assert state_from_proto(pb.JOB_STATE_RUNNING) is JobState.RUNNING
    with pytest.raises(InvalidArgument) as caught:
        state_from_proto(99)
    assert caught.value.field == "state"
