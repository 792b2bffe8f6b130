"""The scheduler's publishers: job life-cycle events, recorded in the outbox."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth_common.events import Outbox
from services.scheduler.store import JobRow


class OutboxJobEvents:
    """Writes ``plinth.job.*`` events in the caller's transaction."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    async def submitted(self, session: AsyncSession, job: JobRow) -> None:
        """``plinth.job.submitted``."""
        message = events_pb2.JobSubmitted(
            job_id=job.id,
            name=job.name,
            team=job.team,
            entrypoint=job.entrypoint,
            register_as=job.register_as,
        )
        await self._outbox.add(session, message, subject=job.id, team=job.team)

    async def admitted(self, session: AsyncSession, job: JobRow) -> None:
        """``plinth.job.admitted``, with how long the job waited in the queue."""
        wait = (job.admitted_at - job.created_at).total_seconds() if job.admitted_at else 0.0
        await self._outbox.add(
            session,
            events_pb2.JobAdmitted(job_id=job.id, team=job.team, queue_wait_seconds=wait),
            subject=job.id,
            team=job.team,
        )

    async def started(self, session: AsyncSession, job: JobRow) -> None:
        """``plinth.job.started``."""
        await self._outbox.add(
            session,
            events_pb2.JobStarted(job_id=job.id, team=job.team, pid=job.pid or 0),
            subject=job.id,
            team=job.team,
        )

    async def finished(self, session: AsyncSession, job: JobRow) -> None:
        """``plinth.job.finished``: status, exit code or signal, duration, MLflow run id, outputs."""
        started = job.started_at or job.admitted_at or job.created_at
        duration = (job.finished_at - started).total_seconds() if job.finished_at else 0.0
        message = events_pb2.JobFinished(
            job_id=job.id,
            name=job.name,
            team=job.team,
            status=events_pb2.JOB_OUTCOME_SUCCEEDED
            if job.state == "SUCCEEDED"
            else events_pb2.JOB_OUTCOME_FAILED,
            exit_code=job.exit_code or 0,
            signal=job.signal or 0,
            duration_seconds=duration,
            mlflow_run_id=job.mlflow_run_id,
            outputs=job.outputs,
            register_as=job.register_as,
            entrypoint=job.entrypoint,
            failure_reason=job.failure_reason,
        )
        await self._outbox.add(session, message, subject=job.id, team=job.team)

    async def cancelled(self, session: AsyncSession, job: JobRow, reason: str) -> None:
        """``plinth.job.cancelled``."""
        await self._outbox.add(
            session,
            events_pb2.JobCancelled(job_id=job.id, team=job.team, reason=reason),
            subject=job.id,
            team=job.team,
        )
