"""The registry's events: ``plinth.model.*`` publishers (via the outbox) and the consumer of
``plinth.job.finished`` that registers the models jobs log.
"""

from __future__ import annotations

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth_common.events import CloudEvent, Outbox
from services.registry.domain import FinishedJob, ModelVersion, Promotion
from services.registry.service import RegistryService

JOB_FINISHED = "plinth.job.finished"
CONSUMER = "registry-job-finished"


class OutboxModelEvents:
    """Writes ``plinth.model.*`` events in the caller's transaction; subject = the model name."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    async def version_created(
        self, session: AsyncSession, version: ModelVersion, *, job_id: str
    ) -> None:
        """``plinth.model.version_created``."""
        message = events_pb2.ModelVersionCreated(
            model_name=version.name,
            version=version.version,
            team=version.team,
            run_id=version.run_id,
            source_job_id=job_id,
            source=version.source,
        )
        await self._outbox.add(session, message, subject=version.name, team=version.team)

    async def promoted(self, session: AsyncSession, promotion: Promotion) -> None:
        """``plinth.model.promoted``: the new and previous version and where its files are."""
        version = promotion.version
        message = events_pb2.ModelPromoted(
            model_name=version.name,
            alias=promotion.alias,
            version=version.version,
            previous_version=promotion.previous_version,
            team=version.team,
            source=version.source,
            run_id=version.run_id,
        )
        await self._outbox.add(session, message, subject=version.name, team=version.team)


def finished_job(payload: events_pb2.JobFinished, event: CloudEvent) -> FinishedJob:
    """``JobFinished`` -> the registry's view of it."""
    return FinishedJob(
        job_id=payload.job_id or event.subject,
        team=payload.team or event.team,
        succeeded=payload.status == events_pb2.JOB_OUTCOME_SUCCEEDED,
        register_as=payload.register_as,
        mlflow_run_id=payload.mlflow_run_id or payload.outputs.get("mlflow_run_id", ""),
        model_uri=payload.outputs.get("model_uri", ""),
        entrypoint=tuple(payload.entrypoint),
    )


class JobFinishedHandler:
    """Handles ``plinth.job.finished``: registers the job's model when it asked and succeeded.

    Raising (MLflow unavailable, the run's model missing, another team's model) means retry,
    then the dead-letter subject with the reason.
    """

    def __init__(self, service: RegistryService) -> None:
        self._service = service

    async def __call__(self, session: AsyncSession, event: CloudEvent, payload: Message) -> None:
        if not isinstance(payload, events_pb2.JobFinished):
            return
        await self._service.register_finished_job(session, finished_job(payload, event))
