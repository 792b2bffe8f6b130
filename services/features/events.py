"""The features service's publishers: ``plinth.features.*`` events, recorded in the outbox."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth_common.events import Outbox
from services.features.domain import Materialization


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


class OutboxFeatureEvents:
    """Writes ``plinth.features.*`` events in the caller's transaction.

    Args:
        outbox: the service's outbox.
        project: the Feast project, the events' subject.
    """

    def __init__(self, outbox: Outbox, *, project: str) -> None:
        self._outbox = outbox
        self._project = project

    async def materialized(
        self, session: AsyncSession, run: Materialization, *, team: str = ""
    ) -> None:
        """``plinth.features.materialized``: the views of ``team``, the window and how long it
        took (the event carries the team, so only its members' streams deliver it)."""
        message = events_pb2.FeaturesMaterialized(
            feature_views=list(run.feature_views),
            start_time=_timestamp(run.start_time),
            end_time=_timestamp(run.end_time),
            duration_seconds=run.duration_seconds,
        )
        await self._outbox.add(session, message, subject=self._project, team=team)
