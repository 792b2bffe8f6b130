"""Regressions from the issue-8 review of the scheduler service: each test failed before its fix.

The service runs on a real SQLite store with fake executors (see ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from plinth_common.db import Database
from plinth_common.errors import Unavailable
from services.scheduler.domain import (
    EndReason,
    ExitStatus,
    Job,
    JobSpec,
    JobState,
    Resources,
    RetryPolicy,
)
from services.scheduler.executors.router import FlavorRouter
from services.scheduler.local_executor import LocalExecutor
from services.scheduler.queueing.model import QueueConfig
from services.scheduler.service import JobEnvironment, SchedulerService
from services.scheduler.store import SqlJobStore
from tests.helpers import ADMIN, eventually
from tests.unit.scheduler.conftest import Clock, MakeService, event_types
from tests.unit.scheduler.fakes import FakeExecutor, FakeHandle

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


def queues(flavor: str) -> str:
    return f"""
flavors:
  - {{name: {flavor}, executor: local}}
cluster_queues:
  - name: ml-queue
    teams: [ml]
    flavors:
      - flavor: {flavor}
        resources:
          cpu: {{nominal: 2}}
          memory: {{nominal: 8Gi}}
"""


def routed_service(store: SqlJobStore, local: FakeExecutor) -> SchedulerService:
    """A service whose executor is a FlavorRouter fed from the configuration in force, as the
    scheduler process builds it (every flavor here runs on the local executor)."""
    router = FlavorRouter(local)

    def on_config(config: QueueConfig) -> None:
        router.update(dict.fromkeys(config.flavors, local))

    service = SchedulerService(
        store=store,
        executor=router,
        job_env=JobEnvironment(mlflow_tracking_uri="http://mlflow.test", base={}),
        finish_attempts=2,
        on_config=on_config,
    )
    return service


async def settled(service: SchedulerService) -> None:
    await asyncio.wait_for(service.wait_idle(), timeout=10)


# -- 1. a flavor dropped while its jobs run ----------------------------------------------------


async def test_dropping_a_flavor_with_running_jobs_warns_and_they_stay_cancellable_and_recoverable(
    store: SqlJobStore,
) -> None:
    local = FakeExecutor()
    service = routed_service(store, local)
    await service.apply_queue_config(ADMIN, queues("local"))
    running = await service.submit(ADMIN, spec("running"))
    survivor = await service.submit(ADMIN, spec("survivor"))
    assert await service.dispatch_once() == 2
    assert (await service.get(ADMIN, running.id)).flavor == "local"

    applied = await service.apply_queue_config(ADMIN, queues("cpu"))
    assert any("flavor local is dropped while 2 admitted job(s)" in w for w in applied.warnings), (
        applied.warnings
    )
    # Cancel goes through the dropped flavor's executor, and the outcome is recorded.
    await service.cancel(ADMIN, running.id)

    async def cancelled() -> bool:
        return (await service.get(ADMIN, running.id)).state is JobState.CANCELLED

    await eventually(cancelled, timeout=10)
    assert local.terminated == [running.id]

    # A restart whose configuration never had `local`: the job is re-attached, not orphaned.
    await service.stop()
    restarted = FakeExecutor(survivors={survivor.id: local.handles[survivor.id]})
    second = routed_service(store, restarted)
    await second.start()
    try:
        assert (await second.get(ADMIN, survivor.id)).state is JobState.RUNNING
        restarted.handles[survivor.id].exit(ExitStatus(exit_code=0))
        await settled(second)
        assert (await second.get(ADMIN, survivor.id)).state is JobState.SUCCEEDED
    finally:
        await second.stop()


class BrokenReattach(FakeExecutor):
    """Re-attaching one job fails (an engine error); the others re-attach."""

    async def reattach(self, job: Job) -> FakeHandle | None:
        if job.name == "broken":
            raise RuntimeError("engine answered 500")
        return await super().reattach(job)


async def test_one_job_that_cannot_be_recovered_does_not_stop_the_start(
    make_service: MakeService, executor: FakeExecutor, store: SqlJobStore
) -> None:
    first = make_service(executor)
    broken = await first.submit(ADMIN, spec("broken"))
    fine = await first.submit(ADMIN, spec("fine"))
    assert await first.dispatch_once() == 2
    await first.stop()
    restarted = BrokenReattach(survivors={fine.id: executor.handles[fine.id]})
    second = make_service(restarted)
    await second.start()  # raised RuntimeError before the fix
    assert (await second.get(ADMIN, broken.id)).state is JobState.RUNNING  # left for next time
    restarted.handles[fine.id].exit(ExitStatus(exit_code=0))
    await settled(second)
    assert (await second.get(ADMIN, fine.id)).state is JobState.SUCCEEDED


# -- 4. a stale snapshot must not overwrite a cancel ---------------------------------------------


async def test_a_cancel_that_comes_after_the_pass_read_wins_over_the_maximum_run_time(
    make_service: MakeService, executor: FakeExecutor
) -> None:
    clock = Clock()
    executor.on_terminate = None  # the process ignores SIGTERM for now
    service = make_service(executor, clock=clock)
    job = await service.submit(ADMIN, spec(max_run_time_s=60))
    await service.dispatch_once()
    snapshot = await service.get(ADMIN, job.id)  # what the pass read
    await service.cancel(ADMIN, job.id)  # then the user cancels
    clock.advance(61)
    await service._enforce_run_times([snapshot], clock())
    executor.handles[job.id].exit(ExitStatus(exit_code=0, signal=15))
    await settled(service)
    done = await service.get(ADMIN, job.id)
    assert done.state is JobState.CANCELLED, done


class UnreachableAfterGate(FakeExecutor):
    """An engine that turns out unreachable once the test opens the gate."""

    async def launch(self, job: Job, env: Mapping[str, str]) -> FakeHandle:
        assert self.launch_gate is not None
        await self.launch_gate.wait()
        raise Unavailable("connection refused", dependency="ray")


async def test_a_job_cancelled_while_its_unreachable_engine_was_tried_ends_cancelled(
    make_service: MakeService,
) -> None:
    executor = UnreachableAfterGate(launch_gate=asyncio.Event())
    service = make_service(executor)
    job = await service.submit(ADMIN, spec())
    dispatch = asyncio.create_task(service.dispatch_once())
    for _ in range(200):
        if (await service.get(ADMIN, job.id)).state is JobState.ADMITTED:
            break
        await asyncio.sleep(0.01)
    await service.cancel(ADMIN, job.id)
    executor.launch_gate.set()  # type: ignore[union-attr]
    assert await dispatch == 0
    done = await service.get(ADMIN, job.id)
    assert done.state is JobState.CANCELLED, done
    assert await service.dispatch_once() == 0


async def test_an_unreachable_engine_requeues_with_an_event_saying_why(
    make_service: MakeService, db: Database
) -> None:
    executor = UnreachableAfterGate(launch_gate=asyncio.Event())
    executor.launch_gate.set()  # type: ignore[union-attr]
    service = make_service(executor)
    job = await service.submit(ADMIN, spec())
    assert await service.dispatch_once() == 0
    assert (await service.get(ADMIN, job.id)).state is JobState.QUEUED
    assert (await event_types(db, job.id))[-1] == "plinth.job.requeued"


# -- 5. a requeue keeps no stop flags -----------------------------------------------------------


def _admitted(**fields: Any) -> Job:
    now = datetime.now(UTC) - timedelta(seconds=5)
    return Job(
        id=fields.pop("id", "j-admitted"),
        spec=spec("admitted"),
        state=JobState.ADMITTED,
        created_at=now,
        admitted_at=now,
        **fields,
    )


async def test_requeue_clears_a_preemption_requested_of_the_admission() -> None:
    job = _admitted().request_stop(EndReason.PREEMPTED, "preempted by job j-x")
    requeued = job.requeue()
    assert requeued.state is JobState.QUEUED
    assert (requeued.stop_reason, requeued.stop_message, requeued.stopping) == (None, "", False)


async def test_an_admitted_job_with_a_cancel_requested_is_cancelled_on_recovery(
    make_service: MakeService, store: SqlJobStore
) -> None:
    async with store.transaction() as tx:
        await tx.add(_admitted(id="j-cancel-me", cancel_requested=True))
    executor = FakeExecutor()
    service = make_service(executor)
    await service.recover()
    done = await service.get(ADMIN, "j-cancel-me")
    assert done.state is JobState.CANCELLED, done
    assert await service.dispatch_once() == 0 and executor.launched == []


# -- 3. an active job counts in the queue that admitted it -----------------------------------

TWO_QUEUES = """
flavors:
  - {{name: cpu}}
cluster_queues:
  - name: first
    teams: [{first}]
    flavors:
      - flavor: cpu
        resources: {{cpu: {{nominal: 2}}, memory: {{nominal: 8Gi}}}}
  - name: second
    teams: [{second}]
    flavors:
      - flavor: cpu
        resources: {{cpu: {{nominal: 2}}, memory: {{nominal: 8Gi}}}}
"""


async def test_a_running_job_counts_in_the_queue_that_admitted_it_after_its_team_moved(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    executor.capacity = Resources(cpu=4.0, memory_bytes=16 * 1024**3)
    await service.apply_queue_config(ADMIN, TWO_QUEUES.format(first="ml", second="other"))
    running = await service.submit(ADMIN, spec("running", cpu=2))
    assert await service.dispatch_once() == 1
    assert (await service.get(ADMIN, running.id)).queue == "first"
    # The team moves to `second`: its running job still holds `first`'s quota, not `second`'s.
    await service.apply_queue_config(ADMIN, TWO_QUEUES.format(first="other", second="ml"))
    moved = await service.submit(ADMIN, spec("moved", cpu=2))
    assert moved.queue == "second"
    assert await service.dispatch_once() == 1
    view = await service.queue_status(ADMIN)
    usage = {
        q.name: next(u.usage for u in q.resources if u.resource == "cpu")
        for q in view.report.queues
    }
    assert usage == {"first": 2, "second": 2}, usage


# -- 2. one job held and queued at once ------------------------------------------------------


async def test_a_job_both_active_and_queued_in_one_pass_is_not_admitted_twice(
    service: SchedulerService, executor: FakeExecutor, store: SqlJobStore
) -> None:
    job = await service.submit(ADMIN, spec("twice", cpu=1))
    assert await service.dispatch_once() == 1
    # The pass's reads straddle a requeue: the active read still shows it running, the
    # queued read (later) shows it queued again.
    async with store.transaction() as tx:
        current = await tx.get(job.id)
        assert current is not None
        await tx.replace(
            dataclasses.replace(current, state=JobState.QUEUED, pid=None, started_at=None),
            expect=JobState.RUNNING,
        )
    stale_active = [await service.get(ADMIN, job.id)]
    stale_active = [dataclasses.replace(stale_active[0], state=JobState.RUNNING)]
    real_in_states = store.in_states

    async def in_states(states: Any) -> list[Job]:
        found = await real_in_states(states)
        return [*found, *stale_active] if JobState.RUNNING in states else found

    service._store = _Patched(store, in_states=in_states)  # type: ignore[assignment]
    service._writes += 1  # as the requeue's own write would
    await service.dispatch_once()
    view = await service.queue_status(ADMIN)
    (queue,) = view.report.queues
    cpu = next(u.usage for u in queue.resources if u.resource == "cpu")
    assert cpu == 1, f"the one-cpu job is counted {cpu} times"


class _Patched:
    """The store with some of its reads replaced."""

    def __init__(self, store: SqlJobStore, **reads: Any) -> None:
        self._store = store
        self._reads = reads

    def __getattr__(self, name: str) -> Any:
        return self._reads.get(name) or getattr(self._store, name)


# -- 6. an engine loaded for the configuration in force -----------------------------------------


async def test_a_configuration_applied_during_a_pass_is_loaded_before_its_engine_cycles(
    service: SchedulerService, executor: FakeExecutor, store: SqlJobStore
) -> None:
    roomy = queues("cpu")
    await service.apply_queue_config(ADMIN, roomy)
    job = await service.submit(ADMIN, spec("waiting", cpu=2))
    # A configuration in which the job cannot be admitted (its queue holds 1 cpu).
    await service.apply_queue_config(ADMIN, roomy.replace("cpu: {nominal: 2}", "cpu: {nominal: 1}"))
    assert await service.dispatch_once() == 0
    gate = asyncio.Event()
    real_index = store.queued_index

    async def queued_index() -> dict[str, int]:
        await gate.wait()
        return await real_index()

    service._store = _Patched(store, queued_index=queued_index)  # type: ignore[assignment]
    service._writes += 1  # the pass reads the queued ids (and waits at the gate)
    dispatch = asyncio.create_task(service.dispatch_once())
    await asyncio.sleep(0.05)
    await service.apply_queue_config(ADMIN, roomy)  # the roomy one again, mid-pass
    gate.set()
    started = await dispatch
    started += await service.dispatch_once()
    assert started == 1 and executor.launched == [job.id]


# -- 13. a cancel that does not commit leaves the job queued, and in the engine ------------------


class _CommitFails:
    """The store, whose transactions roll back at their end (the commit is lost)."""

    def __init__(self, store: SqlJobStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with self._store.transaction() as tx:
            yield tx
            raise ConnectionResetError("connection lost at commit")


async def test_a_cancel_whose_commit_fails_leaves_the_job_pending_in_the_report(
    service: SchedulerService, store: SqlJobStore
) -> None:
    job = await service.submit(ADMIN, spec("stays"))
    assert [p.job_id for p in (await service.queue_status(ADMIN)).report.pending] == [job.id]
    service._store = _CommitFails(store)  # type: ignore[assignment]
    with pytest.raises(ConnectionResetError):
        await service.cancel(ADMIN, job.id)
    service._store = store
    service._report = None  # no cached report: what the engine holds now
    assert (await service.get(ADMIN, job.id)).state is JobState.QUEUED
    assert [p.job_id for p in (await service.queue_status(ADMIN)).report.pending] == [job.id]


# -- 10. a launch whose pid was never recorded -------------------------------------------------


async def test_a_supervisor_launched_without_a_recorded_pid_is_found_by_its_folder(
    tmp_path: Path,
) -> None:
    executor = LocalExecutor(tmp_path, capacity=Resources(cpu=1))
    job = Job(
        id="j-nopid",
        spec=JobSpec(
            name="j",
            team="t",
            entrypoint=[sys.executable, "-c", "import time; time.sleep(60)"],
            working_dir=executor.prepare("j-nopid"),
        ),
        state=JobState.ADMITTED,
        created_at=datetime.now(UTC),
    )
    launched = await executor.launch(job, {"PATH": os.environ["PATH"]})
    try:
        # The scheduler died before committing RUNNING: the row says ADMITTED, no pid.
        found = await LocalExecutor(tmp_path, capacity=Resources(cpu=1)).reattach(job)
        assert found is not None and found.pid == launched.pid
        await executor.terminate(job, grace_s=0.5)  # found the same way
        status = await asyncio.wait_for(launched.wait(), timeout=30)
        assert status.signal or status.exit_code != 0
    finally:
        with suppress(ProcessLookupError):
            os.kill(launched.pid, signal.SIGKILL)


async def test_an_admitted_job_whose_supervisor_still_runs_is_reattached_not_requeued(
    make_service: MakeService, store: SqlJobStore
) -> None:
    async with store.transaction() as tx:
        await tx.add(_admitted(id="j-launched"))
    handle = FakeHandle(pid=4242)
    executor = FakeExecutor(survivors={"j-launched": handle})
    service = make_service(executor)
    await service.recover()
    running = await service.get(ADMIN, "j-launched")
    assert (running.state, running.pid) == (JobState.RUNNING, 4242)
    assert await service.dispatch_once() == 0 and executor.launched == []  # not run twice
    handle.exit(ExitStatus(exit_code=0))
    await settled(service)
    assert (await service.get(ADMIN, "j-launched")).state is JobState.SUCCEEDED


# -- 12. a changed job is answered with its attempts --------------------------------------------


async def test_cancelling_a_retried_job_answers_with_its_finished_attempts(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    retry = RetryPolicy(user_failure_limit=1, backoff_initial_s=600)
    job = await service.submit(ADMIN, spec(retry=retry))
    assert await service.dispatch_once() == 1
    executor.handles[job.id].exit(ExitStatus(exit_code=1))
    await settled(service)
    cancelled = await service.cancel(ADMIN, job.id)  # queued, backing off
    assert cancelled.state is JobState.CANCELLED
    assert [a.number for a in cancelled.attempts] == [1]
