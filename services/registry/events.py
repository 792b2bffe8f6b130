"""The registry's events: ``plinth.model.*`` publishers (via the outbox) and the consumer of
``plinth.job.finished`` that registers the models jobs log.
"""

from __future__ import annotations

from typing import Protocol

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth_common.db import Database
from plinth_common.events import CloudEvent, EffectHandler, Outbox, Record
from plinth_common.events.consumer import ConsumerOptions
from services.registry.domain import FinishedJob, ModelVersion, Promotion
from services.registry.healing import MlflowGate
from services.registry.service import RegistryService
from services.registry.store import add_promotion

JOB_FINISHED = "plinth.job.finished"
CONSUMER = "registry-job-finished"
#: The job.finished consumer's delivery policy. A registration waits up to the handler's budget
#: (30 s) into an MLflow outage, then each delivery fails fast with Unavailable, which the
#: consumer retries after these delays without counting it toward max_deliver, until the event
#: is 10 minutes old (ConsumerSettings.unavailable_max_age_s): an outage dead-letters nothing,
#: and a registration follows MLflow's return within 15 s. A batch of 16 registrations (several
#: MLflow calls each) stays well within the 60 s ack wait.
CONSUMER_OPTIONS: ConsumerOptions = {
    "batch": 16,
    "backoff_s": (1.0, 2.0, 5.0, 10.0, 15.0),
}


class OutboxModelEvents:
    """Writes ``plinth.model.*`` events to the outbox; subject = the model name.

    ``version_created`` and ``promoted`` open a short transaction of their own (the service
    calls them after its MLflow write); the ``add_*`` methods write in the caller's.
    """

    def __init__(self, db: Database, outbox: Outbox) -> None:
        self._db = db
        self._outbox = outbox

    async def version_created(self, version: ModelVersion, *, job_id: str) -> None:
        """``plinth.model.version_created``, in a transaction of its own."""
        async with self._db.transaction() as session:
            await self.add_version_created(session, version, job_id=job_id)

    async def promoted(self, promotion: Promotion) -> None:
        """``plinth.model.promoted``, in a transaction of its own."""
        async with self._db.transaction() as session:
            await self.add_promoted(session, promotion)

    async def add_version_created(
        self, session: AsyncSession, version: ModelVersion, *, job_id: str
    ) -> None:
        """``plinth.model.version_created`` in the caller's transaction."""
        message = events_pb2.ModelVersionCreated(
            model_name=version.name,
            version=version.version,
            team=version.team,
            run_id=version.run_id,
            source_job_id=job_id,
            source=version.source,
        )
        await self._outbox.add(session, message, subject=version.name, team=version.team)

    async def add_promoted(self, session: AsyncSession, promotion: Promotion) -> None:
        """``plinth.model.promoted`` in the caller's transaction: the new and previous version,
        where its files are, who promoted and who approved; the move joins the version's
        history in the same transaction."""
        version = promotion.version
        if version.history:
            await add_promotion(
                session, model=version.name, version=version.version, record=version.history[-1]
            )
        message = events_pb2.ModelPromoted(
            model_name=version.name,
            alias=promotion.alias,
            version=version.version,
            previous_version=promotion.previous_version,
            team=version.team,
            source=version.source,
            run_id=version.run_id,
            promoted_by=promotion.promoted_by,
            approved_by=promotion.approved_by,
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


class VersionCreatedWriter(Protocol):
    """Writes ``model.version_created`` in the caller's transaction (:class:`OutboxModelEvents`)."""

    async def add_version_created(
        self, session: AsyncSession, version: ModelVersion, *, job_id: str
    ) -> None: ...


class JobFinishedHandler(EffectHandler):
    """Handles ``plinth.job.finished``: registers the job's model when it asked and succeeded.

    The registration talks to MLflow with no transaction open (it is idempotent: a version
    tagged with the job id is reused); ``model.version_created`` is then recorded in the
    consumer's short transaction, with the processed-event row. The run's model missing or
    another team's model dead-letters at once, with the reason.

    While MLflow is down (its server dead or restarting) a registration waits for it, up to
    ``wait_budget_s`` after the outage began (a budget shared by every message, so a fetched
    batch waits at most that long in total and is done well within the consumer's ack wait);
    past the budget it raises Unavailable naming MLflow, which the consumer retries with
    backoff (see :data:`CONSUMER_OPTIONS` for how long an outage it rides out).

    Args:
        service: the registry's domain logic.
        events: where ``model.version_created`` is written.
        gate: whether MLflow is usable (None: do not wait, the store decides).
        wait_budget_s: how long into an outage a registration waits for MLflow.
    """

    def __init__(
        self,
        service: RegistryService,
        events: VersionCreatedWriter,
        *,
        gate: MlflowGate | None = None,
        wait_budget_s: float = 30.0,
    ) -> None:
        self._service = service
        self._events = events
        self._gate = gate
        self._wait_budget_s = wait_budget_s

    async def perform(self, event: CloudEvent, payload: Message) -> Record | None:
        """Registers the version; returns the write of its ``version_created`` event.

        Raises:
            Unavailable: MLflow is down (the consumer retries later).
        """
        if not isinstance(payload, events_pb2.JobFinished):
            return None
        job = finished_job(payload, event)
        if (
            self._gate is not None
            and job.register_as
            and job.succeeded
            and not await self._gate.wait_usable(budget_s=self._wait_budget_s)
        ):
            self._gate.check()  # raises Unavailable with the reason MLflow is down
        version = await self._service.register_finished_job(job)
        if version is None:
            return None
        add_event = self._events.add_version_created

        async def record(session: AsyncSession) -> None:
            await add_event(session, version, job_id=job.job_id)

        return record
