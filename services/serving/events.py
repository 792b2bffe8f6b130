"""The serving service's events: ``plinth.deployment.*`` published through the outbox, and the
``plinth.model.promoted`` consumer."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth_common.events import CloudEvent, Outbox
from services.serving.domain import SERVING_ACTOR, Deployment, Promotion
from services.serving.service import ServingService

PROMOTED_SUBJECT = "plinth.model.promoted"
PROMOTED_DURABLE = "serving-model-promoted"


class OutboxDeploymentEvents:
    """Writes ``plinth.deployment.*`` events in the caller's transaction (subject: the deployment)."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    async def ready(
        self,
        session: AsyncSession,
        deployment: Deployment,
        version: str,
        *,
        recovered: bool = False,
    ) -> None:
        """``plinth.deployment.ready``: ``version`` loaded and serving (``recovered``: again,
        after the serving engine restarted)."""
        message = events_pb2.DeploymentReady(
            deployment=deployment.name,
            team=deployment.team,
            model_name=deployment.model_name,
            version=version,
            recovered=recovered,
        )
        await self._outbox.add(session, message, subject=deployment.name, team=deployment.team)

    async def failed(
        self, session: AsyncSession, deployment: Deployment, version: str, reason: str
    ) -> None:
        """``plinth.deployment.failed``: ``version`` could not be served; ``serving_version`` still is."""
        message = events_pb2.DeploymentFailed(
            deployment=deployment.name,
            team=deployment.team,
            model_name=deployment.model_name,
            version=version,
            reason=reason,
            serving_version=deployment.serving_version,
        )
        await self._outbox.add(session, message, subject=deployment.name, team=deployment.team)

    async def traffic_changed(
        self,
        session: AsyncSession,
        deployment: Deployment,
        traffic: Mapping[str, int],
        *,
        previous: Mapping[str, int] | None = None,
        reason: str = "",
        actor: str = SERVING_ACTOR,
    ) -> None:
        """``plinth.deployment.traffic_changed``: percent of requests per version (empty: none,
        deleted), the split before, why, and who moved it."""
        message = events_pb2.DeploymentTrafficChanged(
            deployment=deployment.name,
            team=deployment.team,
            traffic_percent=dict(traffic),
            previous_traffic_percent=dict(previous or {}),
            reason=reason,
            actor=actor,
        )
        await self._outbox.add(session, message, subject=deployment.name, team=deployment.team)


class PromotionHandler:
    """Consumes ``plinth.model.promoted``: retargets the deployments that follow the alias."""

    def __init__(self, service: ServingService) -> None:
        self._service = service

    async def __call__(self, session: AsyncSession, event: CloudEvent, payload: Message) -> None:
        """Runs in the transaction that records the event as processed."""
        if not isinstance(payload, events_pb2.ModelPromoted):
            raise TypeError(f"expected ModelPromoted, got {type(payload).__name__}")
        await self._service.on_promoted(
            session,
            Promotion(
                model_name=payload.model_name,
                alias=payload.alias,
                version=payload.version,
                source=payload.source,
                run_id=payload.run_id,
                time=event.time,
                team=payload.team,
            ),
        )
