"""SchedulerService with a fake executor: admission, life cycle, cancellation, recovery, paging."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from plinth_common.auth import Role
from plinth_common.db import Database
from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from plinth_common.paging import encode_token
from services.scheduler.domain import (
    LOST,
    EndReason,
    ExitStatus,
    Job,
    JobSpec,
    JobState,
    Resources,
    RetryPolicy,
)
from services.scheduler.queueing.model import QueueConfig
from services.scheduler.service import JobEnvironment, JobTransaction, SchedulerService
from services.scheduler.store import SqlJobStore
from tests.helpers import ADMIN, eventually, member
from tests.unit.scheduler.conftest import Clock, MakeService, event_types
from tests.unit.scheduler.fakes import SIGTERM, FakeExecutor

pytestmark = pytest.mark.asyncio(loop_scope="session")


def spec(name: str = "train", *, cpu: float = 1.0, **fields: Any) -> JobSpec:
    return JobSpec(
        **{
            "name": name,
            "team": "ml",
            "entrypoint": ["python", "train.py"],
            "resources": Resources(cpu=cpu),
            **fields,
        }
    )


async def settled(service: SchedulerService) -> None:
    """Waits until the outcome of every ended job is recorded (a job left running fails it)."""
    await asyncio.wait_for(service.wait_idle(), timeout=10)


async def state_of(service: SchedulerService, job: Job) -> JobState:
    return (await service.get(ADMIN, job.id)).state


async def test_queued_jobs_are_admitted_in_fifo_order_within_capacity(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    small = await service.submit(ADMIN, spec("small", cpu=1))
    big = await service.submit(ADMIN, spec("big", cpu=2))
    behind = await service.submit(ADMIN, spec("behind", cpu=1))

    assert await service.dispatch_once() == 1
    # One core is left, but the big job at the head is not overtaken by the one behind it.
    assert [await state_of(service, j) for j in (small, big, behind)] == [
        JobState.RUNNING,
        JobState.QUEUED,
        JobState.QUEUED,
    ]
    assert await service.dispatch_once() == 0

    executor.handles[small.id].exit(ExitStatus(exit_code=0))
    await settled(service)
    assert await service.dispatch_once() == 1
    assert await state_of(service, behind) is JobState.QUEUED

    executor.handles[big.id].exit(ExitStatus(exit_code=0))
    await settled(service)
    assert await service.dispatch_once() == 1
    assert executor.launched == [small.id, big.id, behind.id]


async def test_job_runs_to_success_with_outputs_environment_and_events(
    service: SchedulerService, executor: FakeExecutor, db: Database
) -> None:
    job = await service.submit(ADMIN, spec(env={"GREETING": "hi"}))
    assert job.state is JobState.QUEUED and job.spec.working_dir == f"/jobs/{job.id}/work"

    await service.dispatch_once()
    running = await service.get(ADMIN, job.id)
    assert running.state is JobState.RUNNING and running.pid == executor.handles[job.id].pid
    env = executor.environments[job.id]
    assert env["GREETING"] == "hi" and env["PLINTH_JOB_ID"] == job.id
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.test"

    executor.reported[job.id] = {"mlflow_run_id": "r123", "accuracy": "0.9"}
    executor.handles[job.id].exit(ExitStatus(exit_code=0))
    await settled(service)

    done = await service.get(ADMIN, job.id)
    assert done.state is JobState.SUCCEEDED and done.exit_code == 0 and done.failure_reason == ""
    assert done.mlflow_run_id == "r123" and done.outputs["accuracy"] == "0.9"
    assert done.finished_at is not None and done.started_at is not None
    assert await event_types(db, job.id) == [
        "plinth.job.submitted",
        "plinth.job.admitted",
        "plinth.job.started",
        "plinth.job.finished",
    ]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (ExitStatus(exit_code=3), "exit code 3"),
        (ExitStatus(exit_code=0, signal=9), "killed by signal 9 (SIGKILL)"),
    ],
)
async def test_job_that_exits_badly_fails_with_the_reason(
    service: SchedulerService, executor: FakeExecutor, status: ExitStatus, reason: str
) -> None:
    job = await service.submit(ADMIN, spec())
    await service.dispatch_once()
    executor.handles[job.id].exit(status)
    await settled(service)
    done = await service.get(ADMIN, job.id)
    assert done.state is JobState.FAILED and done.failure_reason == reason
    assert (done.exit_code, done.signal) == (status.exit_code, status.signal)


async def test_job_that_cannot_start_fails_and_frees_its_capacity(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    executor.refuse_launch.add("broken")
    broken = await service.submit(ADMIN, spec("broken", cpu=2))
    after = await service.submit(ADMIN, spec("after", cpu=2))
    assert await service.dispatch_once() == 0
    failed = await service.get(ADMIN, broken.id)
    assert failed.state is JobState.FAILED and "could not start" in failed.failure_reason
    assert await service.dispatch_once() == 1
    assert await state_of(service, after) is JobState.RUNNING


async def test_cancelling_a_queued_job_ends_it_at_once_and_it_never_runs(
    service: SchedulerService, executor: FakeExecutor, db: Database
) -> None:
    job = await service.submit(ADMIN, spec())
    cancelled = await service.cancel(ADMIN, job.id)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.failure_reason == "cancelled before it started"
    assert await service.dispatch_once() == 0 and executor.launched == []
    assert await event_types(db, job.id) == ["plinth.job.submitted", "plinth.job.cancelled"]


async def test_cancelling_a_running_job_stops_its_process_and_ends_it_cancelled(
    service: SchedulerService, executor: FakeExecutor, db: Database
) -> None:
    job = await service.submit(ADMIN, spec())
    await service.dispatch_once()
    await service.cancel(ADMIN, job.id)
    assert executor.terminated == [job.id]
    await settled(service)
    done = await service.get(ADMIN, job.id)
    assert done.state is JobState.CANCELLED and done.signal == SIGTERM
    types = await event_types(db, job.id)
    assert types[-1] == "plinth.job.cancelled" and "plinth.job.finished" not in types


async def test_cancel_of_an_ended_or_unknown_job_is_refused(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    job = await service.submit(ADMIN, spec())
    await service.dispatch_once()
    executor.handles[job.id].exit(ExitStatus(exit_code=0))
    await settled(service)
    with pytest.raises(FailedPrecondition, match="already ended"):
        await service.cancel(ADMIN, job.id)
    with pytest.raises(NotFound) as caught:
        await service.cancel(ADMIN, "j-nope")
    assert caught.value.name == "j-nope"


async def test_restart_reattaches_survivors_fails_vanished_jobs_and_requeues_unstarted_ones(
    make_service: MakeService, executor: FakeExecutor, store: SqlJobStore
) -> None:
    first = make_service(executor)
    survivor = await first.submit(ADMIN, spec("survivor"))
    # Without infrastructure retries: a vanished job fails at once (with them it is retried).
    vanished = await first.submit(
        ADMIN, spec("vanished", retry=RetryPolicy(infrastructure_failure_limit=0))
    )
    await first.dispatch_once()
    # Admitted by a scheduler that died before it started the process (no pid recorded).
    async with store.transaction() as tx:
        unstarted = await tx.add(
            Job(
                id="j-unstarted",
                spec=spec("unstarted", working_dir="/srv/work"),
                state=JobState.ADMITTED,
                created_at=survivor.created_at,
                admitted_at=survivor.created_at,
            )
        )
    await first.stop()  # the scheduler goes away; the processes do not

    restarted = FakeExecutor(survivors={survivor.id: executor.handles[survivor.id]})
    second = make_service(restarted)
    await second.recover()

    lost = await second.get(ADMIN, vanished.id)
    assert lost.state is JobState.FAILED and lost.failure_reason == LOST
    assert await state_of(second, unstarted) is JobState.QUEUED
    assert await state_of(second, survivor) is JobState.RUNNING
    restarted.handles[survivor.id].exit(ExitStatus(exit_code=0))
    await settled(second)
    assert await state_of(second, survivor) is JobState.SUCCEEDED
    assert await second.dispatch_once() == 1 and restarted.launched == [unstarted.id]


@pytest.mark.parametrize(
    ("fields", "field", "repeated"),
    [
        ({"name": "Bad Name"}, "spec.name", "'Bad Name'"),
        ({"name": "x" * 64}, "spec.name", "'xxxx"),
        ({"team": "ML_Team"}, "spec.team", "'ML_Team'"),
        ({"register_as": "../etc/passwd"}, "spec.register_as", "'../etc/passwd'"),
        ({"entrypoint": []}, "spec.entrypoint", ""),
        ({"working_dir": "relative/dir"}, "spec.working_dir", "'relative/dir'"),
        ({"working_dir": "/no/such/dir"}, "spec.working_dir", "'/no/such/dir'"),
        ({"env": {"PLINTH_JOB_ID": "x"}}, "spec.env", "PLINTH_JOB_ID"),
        ({"env": {"1BAD": "x"}}, "spec.env", "'1BAD'"),
        ({"resources": Resources(cpu=3)}, "spec.resources.cpu", "3 cpu exceeds"),
        ({"resources": Resources(memory_bytes=-5)}, "spec.resources.memory_bytes", "-5"),
        ({"resources": Resources(gpu=1)}, "spec.resources.gpu", "1 gpu"),
        ({"priority": "urgent"}, "spec.priority", "'urgent'"),
        ({"replicas": 2000}, "spec.replicas", "2000"),
        ({"replicas": 3, "resources": Resources(cpu=1)}, "spec.replicas", "3 replicas"),
        ({"max_run_time_s": -1.0}, "spec.max_run_time_seconds", "-1"),
        ({"max_run_time_s": 40 * 86400.0}, "spec.max_run_time_seconds", "3456000"),
        (
            {"retry": RetryPolicy(user_failure_limit=101)},
            "spec.retry.user_failure_limit",
            "101",
        ),
    ],
)
async def test_invalid_submission_names_the_field_and_repeats_the_value(
    service: SchedulerService, fields: dict[str, Any], field: str, repeated: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.submit(ADMIN, spec(**fields))
    assert caught.value.field == field
    assert repeated in caught.value.problem, caught.value.message
    assert (await service.list(ADMIN))[0] == []


async def test_listing_pages_newest_first_and_filters(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    submitted = [await service.submit(ADMIN, spec(f"n{i}")) for i in range(5)]
    other = await service.submit(ADMIN, spec("other", team="nlp"))
    seen: list[str] = []
    token = ""
    while True:
        page, token = await service.list(ADMIN, team="ml", page_size=2, page_token=token)
        assert len(page) <= 2
        seen += [job.id for job in page]
        if not token:
            break
    assert seen == [job.id for job in reversed(submitted)]
    await service.cancel(ADMIN, other.id)
    cancelled, _ = await service.list(ADMIN, state=JobState.CANCELLED)
    assert [job.id for job in cancelled] == [other.id]


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"page_token": encode_token("deployments", 3)}, "page_token"),
        ({"page_token": "garbage"}, "page_token"),
        ({"page_size": 501}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"team": "Not A Team"}, "team"),
    ],
)
async def test_listing_refuses_foreign_tokens_and_bad_arguments(
    service: SchedulerService, arguments: dict[str, Any], field: str
) -> None:
    await service.submit(ADMIN, spec())
    with pytest.raises(InvalidArgument) as caught:
        await service.list(ADMIN, **arguments)
    assert caught.value.field == field


async def test_logs_come_from_the_executor(service: SchedulerService) -> None:
    job = await service.submit(ADMIN, spec())
    await service.cancel(ADMIN, job.id)
    chunks = [chunk async for chunk in service.logs(ADMIN, job.id, follow=True)]
    assert b"".join(chunks) == f"log of {job.id}\n".encode()
    with pytest.raises(NotFound):
        [chunk async for chunk in service.logs(ADMIN, "j-nope", follow=False)]


async def test_a_job_cancelled_while_it_is_being_started_is_stopped_once_it_runs(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    executor.launch_gate = asyncio.Event()
    job = await service.submit(ADMIN, spec())
    dispatch = asyncio.create_task(service.dispatch_once())
    await eventually(lambda: _is(service, job, JobState.ADMITTED))
    await service.cancel(ADMIN, job.id)
    executor.launch_gate.set()
    assert await dispatch == 1
    await settled(service)
    done = await service.get(ADMIN, job.id)
    assert done.state is JobState.CANCELLED and done.signal == SIGTERM


async def test_recording_an_outcome_is_retried_when_the_store_fails_briefly(
    make_service: MakeService, executor: FakeExecutor, store: SqlJobStore
) -> None:
    flaky = FlakyStore(store)
    service = make_service(executor, store=flaky)
    job = await service.submit(ADMIN, spec())
    await service.dispatch_once()
    flaky.failures = 1
    executor.handles[job.id].exit(ExitStatus(exit_code=0))
    await settled(service)
    assert flaky.failures == 0, "the store was not called again"
    assert await state_of(service, job) is JobState.SUCCEEDED


async def _is(service: SchedulerService, job: Job, state: JobState) -> bool:
    return await state_of(service, job) is state


class FlakyStore:
    """The real store, whose next ``failures`` transactions fail as a dropped connection would."""

    def __init__(self, store: SqlJobStore) -> None:
        self._store = store
        self.failures = 0
        self.get = store.get
        self.page = store.page
        self.in_states = store.in_states
        self.run_seconds = store.run_seconds
        self.queued_index = store.queued_index
        self.by_ids = store.by_ids
        self.latest_queue_config = store.latest_queue_config
        self.add_queue_config = store.add_queue_config

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[JobTransaction]:
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError("connection to the database was lost")
        async with self._store.transaction() as tx:
            yield tx


# -- queues, preemption, retries, maximum run time -------------------------------------------

QUEUES = """
priority_classes:
  - {name: low, value: 100}
  - {name: normal, value: 500}
  - {name: high, value: 1000}
flavors:
  - {name: cpu}
cluster_queues:
  - name: ml-queue
    teams: [ml]
    preemption: {within_queue: lower_priority}
    flavors:
      - flavor: cpu
        resources:
          cpu: {nominal: 2}
          memory: {nominal: 8Gi}
"""


async def test_a_team_at_its_quota_queues_its_next_job_and_the_queue_says_why(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    await service.apply_queue_config(ADMIN, QUEUES)
    first = await service.submit(ADMIN, spec("first", cpu=2))
    assert first.queue == "ml-queue" and first.priority == "normal"
    assert await service.dispatch_once() == 1
    waiting = await service.submit(ADMIN, spec("waiting", cpu=1))
    assert await service.dispatch_once() == 0

    view = await service.queue_status(member("ann", ml=Role.VIEWER))
    (queue,) = view.report.queues
    cpu = next(u for u in queue.resources if u.resource == "cpu")
    assert (cpu.nominal, cpu.usage, queue.pending, queue.admitted) == (2, 2, 1, 1)
    (pending,) = view.report.pending
    assert pending.job_id == waiting.id and pending.position_in_queue == 1
    assert "cpu" in pending.reason and "2 of" in pending.reason, pending.reason
    job = await service.get(ADMIN, waiting.id)
    assert job.pending is not None and job.pending.reason == pending.reason
    # A member of a team in no queue sees none of it, and may not ask for team ml's.
    outsider = member("bob", nlp=Role.MAINTAINER)
    assert (await service.queue_status(outsider)).report.queues == ()
    with pytest.raises(NotFound):
        await service.queue_status(outsider, team="ml")


async def test_a_higher_priority_job_preempts_a_lower_one_which_is_requeued_at_its_place(
    service: SchedulerService, executor: FakeExecutor, db: Database
) -> None:
    await service.apply_queue_config(ADMIN, QUEUES)
    low = await service.submit(ADMIN, spec("low", cpu=2, priority="low"))
    await service.dispatch_once()
    later_low = await service.submit(ADMIN, spec("later-low", cpu=2, priority="low"))
    high = await service.submit(ADMIN, spec("high", cpu=2, priority="high"))

    assert await service.dispatch_once() == 0  # the preemptor waits for its victim
    assert executor.terminated == [low.id] and executor.graces == [7.0]
    await settled(service)
    requeued = await service.get(ADMIN, low.id)
    assert requeued.state is JobState.QUEUED and requeued.attempt == 2
    assert [a.end_reason for a in requeued.attempts] == [EndReason.PREEMPTED]
    assert f"preempted by job {high.id}" in requeued.attempts[0].message
    types = await event_types(db, low.id)
    assert types[-2:] == ["plinth.job.preempted", "plinth.job.requeued"]

    assert await service.dispatch_once() == 1
    assert await state_of(service, high) is JobState.RUNNING
    executor.handles[high.id].exit(ExitStatus(exit_code=0))
    await settled(service)
    assert await service.dispatch_once() == 1
    # Its place was kept: ahead of the low-priority job submitted after it.
    assert executor.launched == [low.id, high.id, low.id]
    assert await state_of(service, later_low) is JobState.QUEUED
    env = executor.environments[low.id]
    assert env["PLINTH_ATTEMPT"] == "2" and env["PLINTH_CHECKPOINT_DIR"].endswith("checkpoint")
    executor.handles[low.id].exit(ExitStatus(exit_code=0))
    await settled(service)
    done = await service.get(ADMIN, low.id)
    assert done.state is JobState.SUCCEEDED
    assert [a.end_reason for a in done.attempts] == [EndReason.PREEMPTED, EndReason.EXITED]


async def test_a_failed_job_is_retried_after_its_backoff_within_its_budget(
    make_service: MakeService, executor: FakeExecutor, db: Database
) -> None:
    clock = Clock()
    service = make_service(executor, clock=clock)
    retry = RetryPolicy(user_failure_limit=1, backoff_initial_s=10)
    job = await service.submit(ADMIN, spec(retry=retry))
    await service.dispatch_once()
    executor.handles[job.id].exit(ExitStatus(exit_code=1))
    await settled(service)
    waiting = await service.get(ADMIN, job.id)
    assert waiting.state is JobState.QUEUED and waiting.attempt == 2
    assert waiting.not_before == clock.now + timedelta(seconds=10)
    assert (await event_types(db, job.id))[-1] == "plinth.job.retrying"

    clock.advance(5)
    assert await service.dispatch_once() == 0  # still backing off
    clock.advance(6)
    assert await service.dispatch_once() == 1
    assert executor.environments[job.id]["PLINTH_ATTEMPT"] == "2"
    executor.handles[job.id].exit(ExitStatus(exit_code=1))
    await settled(service)
    failed = await service.get(ADMIN, job.id)
    assert failed.state is JobState.FAILED
    assert failed.failure_reason == "exit code 1; user failure retries used up (1 of 1)"
    assert [a.number for a in failed.attempts] == [1, 2]


async def test_an_infrastructure_failure_is_retried_even_without_user_retries(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    job = await service.submit(ADMIN, spec())
    await service.dispatch_once()
    lost = ExitStatus(exit_code=-1, reason="supervisor died", end_reason=EndReason.EXECUTOR_LOST)
    executor.handles[job.id].exit(lost)
    await settled(service)
    retried = await service.get(ADMIN, job.id)
    assert retried.state is JobState.QUEUED and retried.infrastructure_failures == 1
    assert retried.user_failures == 0 and retried.attempt == 2


async def test_a_job_past_its_maximum_run_time_is_stopped_with_that_reason(
    make_service: MakeService, executor: FakeExecutor
) -> None:
    clock = Clock()
    service = make_service(executor, clock=clock)
    job = await service.submit(ADMIN, spec(max_run_time_s=60))
    await service.dispatch_once()
    clock.advance(59)
    await service.dispatch_once()
    assert executor.terminated == []
    clock.advance(2)
    await service.dispatch_once()
    assert executor.terminated == [job.id]
    await settled(service)
    done = await service.get(ADMIN, job.id)
    assert done.state is JobState.FAILED
    assert done.failure_reason == "exceeded its maximum run time of 60 s"
    assert [a.end_reason for a in done.attempts] == [EndReason.RUN_TIME_EXCEEDED]


async def test_queue_config_is_admins_validated_as_a_whole_and_applied_live(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    default = await service.queue_config(ADMIN)
    assert default.version == 0 and "default_queue: default" in default.document
    with pytest.raises(PermissionDenied):
        await service.apply_queue_config(member("ann", ml=Role.MAINTAINER), QUEUES)
    broken = QUEUES.replace("nominal: 2", "nominal: -2").replace("teams: [ml]", "teamz: [ml]")
    with pytest.raises(InvalidArgument) as caught:
        await service.apply_queue_config(ADMIN, broken)
    fields = [f for f, _ in caught.value.violations]
    assert len(fields) >= 2 and any("nominal" in f for f in fields), fields
    assert (await service.queue_config(ADMIN)).version == 0  # the previous one stays
    with pytest.raises(InvalidArgument) as not_yaml:
        await service.apply_queue_config(ADMIN, "flavors: [")
    assert not_yaml.value.field == "document"

    running = await service.submit(ADMIN, spec(cpu=2))
    await service.dispatch_once()
    smaller = QUEUES.replace("nominal: 2", "nominal: 1")
    dry = await service.apply_queue_config(ADMIN, smaller, dry_run=True)
    assert dry.version == 0 and (await service.queue_config(ADMIN)).version == 0
    assert any("keep running" in w for w in dry.warnings), dry.warnings
    applied = await service.apply_queue_config(ADMIN, smaller)
    assert applied.version == 1 and applied.applied_by == ADMIN.name
    assert await state_of(service, running) is JobState.RUNNING  # not stopped by a lower quota
    # Live: the new quota holds at once, and a team in no queue cannot submit.
    with pytest.raises(InvalidArgument) as too_big:
        await service.submit(ADMIN, spec(cpu=2))
    assert too_big.value.field == "spec.resources.cpu"
    with pytest.raises(InvalidArgument) as homeless:
        await service.submit(ADMIN, spec(team="nlp"))
    assert homeless.value.field == "spec.team"


async def test_a_restart_while_a_job_was_being_preempted_stops_and_requeues_it(
    make_service: MakeService, executor: FakeExecutor, store: SqlJobStore
) -> None:
    executor.on_terminate = None  # the job ignores SIGTERM
    first = make_service(executor)
    await first.apply_queue_config(ADMIN, QUEUES)
    low = await first.submit(ADMIN, spec("low", cpu=2, priority="low"))
    await first.dispatch_once()
    high = await first.submit(ADMIN, spec("high", cpu=2, priority="high"))
    await first.dispatch_once()
    assert executor.terminated == [low.id]
    await first.stop()  # the scheduler dies before the victim has stopped

    restarted = FakeExecutor(survivors={low.id: executor.handles[low.id]}, on_terminate=None)
    second = make_service(restarted)
    await second.recover()
    # The stop request may never have reached it: it is asked again, with the same grace.
    assert restarted.terminated == [low.id] and restarted.graces == [7.0]
    restarted.handles[low.id].exit(ExitStatus(exit_code=-1, signal=9))
    await settled(second)
    requeued = await second.get(ADMIN, low.id)
    assert requeued.state is JobState.QUEUED and requeued.attempt == 2
    assert await second.dispatch_once() == 1 and restarted.launched == [high.id]
    view = await second.queue_status(ADMIN)
    assert [p.job_id for p in view.report.pending] == [low.id]


async def test_estimated_start_uses_the_teams_median_run_time_of_jobs_of_that_name(
    make_service: MakeService, executor: FakeExecutor
) -> None:
    clock = Clock()
    service = make_service(executor, clock=clock)
    for seconds in (100, 300, 250):
        job = await service.submit(ADMIN, spec(cpu=2))
        await service.dispatch_once()
        clock.advance(seconds)
        executor.handles[job.id].exit(ExitStatus(exit_code=0))
        await settled(service)
    running = await service.submit(ADMIN, spec(cpu=2))
    await service.dispatch_once()
    started = clock.now
    waiting = await service.submit(ADMIN, spec(cpu=2))
    await service.dispatch_once()
    pending = (await service.get(ADMIN, waiting.id)).pending
    assert pending is not None and pending.estimated_start == started + timedelta(seconds=250)
    assert "median of the last 3 runs of train" in pending.estimate_basis, pending
    assert await state_of(service, running) is JobState.RUNNING


async def test_a_configuration_the_scheduler_cannot_serve_is_refused_and_others_announced(
    store: SqlJobStore, executor: FakeExecutor
) -> None:
    seen: list[int] = []

    def check(config: QueueConfig) -> None:
        if config.cluster_queues["ml-queue"].fair_weight != 1:
            raise InvalidArgument("cluster_queues[0].fair_weight", "not served here")

    service = SchedulerService(
        store=store,
        executor=executor,
        job_env=JobEnvironment(mlflow_tracking_uri="http://mlflow.test", base={}),
        check_config=check,
        on_config=lambda config: seen.append(config.version),
    )
    await service.queue_config(ADMIN)
    with pytest.raises(InvalidArgument) as caught:
        await service.apply_queue_config(
            ADMIN, QUEUES.replace("teams: [ml]", "teams: [ml]\n    fair_weight: 3")
        )
    assert caught.value.field == "cluster_queues[0].fair_weight"
    assert (await service.queue_config(ADMIN)).version == 0
    await service.apply_queue_config(ADMIN, QUEUES)
    assert seen == [0, 1]
