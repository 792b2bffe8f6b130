"""The scheduler's publishers: job life-cycle events, recorded in the outbox.

Writing an event is one INSERT into the outbox table of the caller's transaction; nothing here
talks to the network (the outbox relay publishes after the commit).
"""

from __future__ import annotations

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth_common.events import Outbox
from plinth_common.prototime import to_timestamp
from services.scheduler.domain import Job, JobEvent, JobEventKind, JobState


class OutboxJobEvents:
    """Writes ``plinth.job.*`` events in the caller's transaction."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    async def write(self, session: AsyncSession, event: JobEvent) -> None:
        """Adds the event's message to the outbox of ``session``'s transaction."""
        job = event.job
        await self._outbox.add(session, message_of(event), subject=job.id, team=job.team)


def message_of(event: JobEvent) -> Message:
    """The protobuf message of a job event."""
    job = event.job
    match event.kind:
        case JobEventKind.SUBMITTED:
            return events_pb2.JobSubmitted(
                job_id=job.id,
                name=job.name,
                team=job.team,
                entrypoint=list(job.spec.entrypoint),
                register_as=job.spec.register_as,
            )
        case JobEventKind.ADMITTED:
            queued = job.queued_at or job.created_at
            wait = (job.admitted_at - queued).total_seconds() if job.admitted_at else 0.0
            return events_pb2.JobAdmitted(
                job_id=job.id,
                team=job.team,
                queue_wait_seconds=wait,
                queue=job.queue,
                flavor=job.flavor,
                attempt=job.attempt,
                priority=job.priority,
            )
        case JobEventKind.STARTED:
            return events_pb2.JobStarted(job_id=job.id, team=job.team, pid=job.pid or 0)
        case JobEventKind.FINISHED:
            return _finished(job)
        case JobEventKind.CANCELLED:
            return events_pb2.JobCancelled(job_id=job.id, team=job.team, reason=event.reason)
        case JobEventKind.PREEMPTED:
            return events_pb2.JobPreempted(
                job_id=job.id,
                team=job.team,
                reason=event.reason,
                preempted_by=event.preempted_by,
                attempt=job.attempt,
                requeued=True,
            )
        case JobEventKind.REQUEUED:
            return events_pb2.JobRequeued(
                job_id=job.id, team=job.team, attempt=job.attempt, reason=event.reason
            )
        case JobEventKind.RETRYING:
            return events_pb2.JobRetrying(
                job_id=job.id,
                team=job.team,
                attempt=job.attempt,
                failure_kind=event.failure_kind,
                reason=event.reason,
                backoff_seconds=event.backoff_s,
                not_before=to_timestamp(job.not_before),
            )


def _finished(job: Job) -> events_pb2.JobFinished:
    """``plinth.job.finished``: status, exit code or signal, duration, MLflow run id, outputs."""
    started = job.started_at or job.admitted_at or job.created_at
    duration = (job.finished_at - started).total_seconds() if job.finished_at else 0.0
    return events_pb2.JobFinished(
        job_id=job.id,
        name=job.name,
        team=job.team,
        status=events_pb2.JOB_OUTCOME_SUCCEEDED
        if job.state is JobState.SUCCEEDED
        else events_pb2.JOB_OUTCOME_FAILED,
        exit_code=job.exit_code or 0,
        signal=job.signal or 0,
        duration_seconds=duration,
        mlflow_run_id=job.mlflow_run_id,
        outputs=dict(job.outputs),
        register_as=job.spec.register_as,
        entrypoint=list(job.spec.entrypoint),
        failure_reason=job.failure_reason,
    )
