"""The scheduler's queues through the gRPC API, with real job processes: quota reasons,
preemption with a checkpoint kept across attempts, and a restart that keeps queues, positions,
attempts and usage."""

from __future__ import annotations

import json

import grpc
import pytest

from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.auth import Role
from plinth_common.nats_server import NatsServer
from tests.component.test_scheduler import FINAL, PY, Scheduler, StartScheduler, start_scheduler
from tests.helpers import EventRecorder, channel_as, eventually, member

pytestmark = pytest.mark.asyncio(loop_scope="session")

__all__ = ["start_scheduler"]  # the fixture, shared with test_scheduler

# Team ml gets one core; priorities low < high; preemption within the queue by priority.
QUEUES = {
    "priority_classes": [
        {"name": "low", "value": 100},
        {"name": "normal", "value": 500},
        {"name": "high", "value": 1000},
    ],
    "flavors": [{"name": "cpu"}],
    "cluster_queues": [
        {
            "name": "ml-queue",
            "teams": ["ml"],
            "preemption": {"within_queue": "lower_priority"},
            "flavors": [
                {
                    "flavor": "cpu",
                    "resources": {"cpu": {"nominal": 1}, "memory": {"nominal": "4Gi"}},
                }
            ],
        }
    ],
}
SLEEP = "import time; time.sleep(60)"


async def _apply(scheduler: Scheduler, document: dict[str, object]) -> pb.QueueConfigInfo:
    # JSON is YAML: the RPC takes either.
    return await scheduler.stub.ApplyQueueConfig(
        pb.ApplyQueueConfigRequest(document=json.dumps(document))
    )


async def _pending(scheduler: Scheduler, job_id: str) -> pb.Job | None:
    job = await scheduler.stub.GetJob(pb.GetJobRequest(job_id=job_id))
    return job if job.state == pb.JOB_STATE_QUEUED and job.pending.reason else None


async def test_a_team_at_quota_queues_its_next_job_and_any_member_reads_why(
    start_scheduler: StartScheduler,
) -> None:
    scheduler = await start_scheduler()
    info = await _apply(scheduler, QUEUES)
    assert info.version == 1 and "ml-queue" in info.document
    running = await scheduler.submit(PY, "-c", SLEEP, name="first")
    await scheduler.wait_state(running.id, pb.JOB_STATE_RUNNING)
    waiting = await scheduler.submit(PY, "-c", "pass", name="second")
    job = await eventually(lambda: _pending(scheduler, waiting.id))
    assert job.queue == "ml-queue" and job.pending.position_in_queue == 1
    assert "cpu" in job.pending.reason and "1 of" in job.pending.reason, job.pending.reason

    # A viewer of the team reads the queue without admin rights.
    async with channel_as(f"127.0.0.1:{scheduler.app.port}", member("v", ml=Role.VIEWER)) as ch:
        status = await scheduler_pb2_grpc.SchedulerServiceStub(ch).GetQueue(pb.GetQueueRequest())
    (queue,) = status.queues
    cpu = next(u for u in queue.usage if u.resource == "cpu")
    assert (queue.name, cpu.nominal, cpu.used, queue.pending, queue.admitted) == (
        "ml-queue",
        1,
        1,
        1,
        1,
    )
    assert [p.job_id for p in status.pending] == [waiting.id]
    assert status.pending[0].name == "second" and status.pending[0].info.reason

    # A job no flavor could ever hold is refused at submission, naming the field.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.submit(PY, "-c", "pass", resources=pb.Resources(cpu=4))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.resources.cpu" in (caught.value.details() or "")

    await scheduler.stub.CancelJob(pb.CancelJobRequest(job_id=running.id))
    done = await scheduler.wait_state(waiting.id, *FINAL)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.queue_wait_seconds > 0


# Attempt 1 writes its checkpoint and runs until preempted; attempt 2 finds it and finishes.
RESUMABLE = """
import os, pathlib, sys, time
step = pathlib.Path(os.environ["PLINTH_CHECKPOINT_DIR"]) / "step"
if os.environ["PLINTH_ATTEMPT"] == "1":
    step.write_text("trained to step 100")
    print("checkpoint written", flush=True)
    time.sleep(60)
    sys.exit(3)
print("resumed from", step.read_text())
"""


async def test_a_high_priority_job_preempts_a_low_one_which_resumes_from_its_checkpoint(
    start_scheduler: StartScheduler, nats_server: NatsServer
) -> None:
    scheduler = await start_scheduler(PLINTH_SCHEDULER_PREEMPTION_GRACE_S="2")
    await _apply(scheduler, QUEUES)
    async with EventRecorder(nats_server.url) as recorder:
        low = await scheduler.submit(PY, "-c", RESUMABLE, name="low", priority="low")
        await scheduler.wait_state(low.id, pb.JOB_STATE_RUNNING)
        await eventually(lambda: _logged(scheduler, low.id, b"checkpoint written"))
        high = await scheduler.submit(PY, "-c", "print('urgent')", name="high", priority="high")
        done_high = await scheduler.wait_state(high.id, *FINAL)
        done_low = await scheduler.wait_state(low.id, *FINAL)
        await eventually(lambda: _has(recorder.of(low.id), "plinth.job.finished"))
    assert done_high.state == pb.JOB_STATE_SUCCEEDED
    assert done_low.state == pb.JOB_STATE_SUCCEEDED, done_low.failure_reason
    assert [a.end_reason for a in done_low.attempts] == [
        pb.END_REASON_PREEMPTED,
        pb.END_REASON_EXITED,
    ]
    assert done_low.attempt == 2 and f"job {high.id}" in done_low.attempts[0].message
    logs = await _log(scheduler, low.id)
    assert b"resumed from trained to step 100" in logs, logs
    events = recorder.of(low.id)
    assert "plinth.job.preempted" in events and "plinth.job.requeued" in events
    assert events.count("plinth.job.admitted") == 2


async def test_a_restart_keeps_queues_positions_attempts_and_usage(
    start_scheduler: StartScheduler,
) -> None:
    first = await start_scheduler()
    await _apply(first, QUEUES)
    half = pb.Resources(cpu=0.5)
    running = await first.submit(PY, "-c", SLEEP, name="running", resources=half)
    await first.wait_state(running.id, pb.JOB_STATE_RUNNING)
    # A failed attempt, to be retried in ten minutes: it waits with one attempt on record.
    retried = await first.submit(
        PY,
        "-c",
        "import sys; sys.exit(1)",
        name="retried",
        resources=half,
        retry=pb.RetryPolicy(user_failure_limit=1, backoff_initial_seconds=600),
    )
    await eventually(lambda: _attempt_is(first, retried.id, 2))
    behind = [await first.submit(PY, "-c", "pass", name=f"behind-{i}") for i in range(2)]
    before = await eventually(lambda: _queue_with(first, 3))
    await first.close()

    second = await start_scheduler()
    after = await eventually(lambda: _queue_with(second, 3))
    assert _positions(after) == _positions(before)
    assert [p.job_id for p in after.pending] == [*[b.id for b in behind], retried.id]
    assert _usage(after) == _usage(before) and _usage(after)[("cpu", "cpu")] == 0.5
    job = await second.stub.GetJob(pb.GetJobRequest(job_id=retried.id))
    assert job.state == pb.JOB_STATE_QUEUED and job.attempt == 2
    assert [a.exit_code for a in job.attempts[:1]] == [1]
    assert (await second.stub.GetQueueConfig(pb.GetQueueConfigRequest())).version == 1
    for job_id in (running.id, retried.id, *[b.id for b in behind]):
        await second.stub.CancelJob(pb.CancelJobRequest(job_id=job_id))
    await second.wait_state(running.id, *FINAL)


async def _queue_with(scheduler: Scheduler, pending: int) -> pb.QueueStatus | None:
    status = await scheduler.stub.GetQueue(pb.GetQueueRequest())
    return status if len(status.pending) == pending and status.queues[0].admitted == 1 else None


def _positions(status: pb.QueueStatus) -> list[tuple[str, int, int]]:
    return [(p.job_id, p.info.position_in_queue, p.info.position_in_cohort) for p in status.pending]


def _usage(status: pb.QueueStatus) -> dict[tuple[str, str], float]:
    return {(u.flavor, u.resource): u.used for q in status.queues for u in q.usage}


async def _attempt_is(scheduler: Scheduler, job_id: str, attempt: int) -> bool:
    job = await scheduler.stub.GetJob(pb.GetJobRequest(job_id=job_id))
    return job.state == pb.JOB_STATE_QUEUED and job.attempt == attempt


async def _log(scheduler: Scheduler, job_id: str) -> bytes:
    stream = scheduler.stub.StreamJobLogs(pb.StreamJobLogsRequest(job_id=job_id))
    return b"".join([chunk.data async for chunk in stream])


async def _logged(scheduler: Scheduler, job_id: str, needle: bytes) -> bool:
    return needle in await _log(scheduler, job_id)


async def _has(events: list[str], event: str) -> bool:
    return event in events
