"""The platform event stream: ``plinth.events``.

Example:
    >>> from datetime import UTC, datetime, timedelta
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     since = datetime.now(UTC) - timedelta(hours=1)
    ...     for event in plinth.events.watch(types=["job.finished"], since=since):
    ...         print(event.sequence, event.type, event.subject)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_sdk.models import Event
from plinth_sdk.transport import Transport

__all__ = ["EventsAPI"]


class EventsAPI:
    """The platform event stream: ``plinth.events``.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(gateway_pb2_grpc.EventServiceStub)

    def watch(
        self,
        *,
        types: Sequence[str] = (),
        team: str | None = None,
        since: datetime | None = None,
        after_sequence: int | None = None,
    ) -> Iterator[Event]:
        """Yields platform events, then follows them as they are published; the stream has no
        deadline.

        Without ``since`` or ``after_sequence`` only events published from now on come.
        Each event's ``sequence`` is its place in the platform's stream: watch again with
        ``after_sequence=`` the last one you handled to resume exactly after it.

        Args:
            types: Only these types, e.g. ``"plinth.job.finished"`` or ``"job.finished"``;
                empty for all.
            team: Only this team's events; None for every team.
            since: First replay the events stored from this time on (a naive datetime is
                UTC; a future one: nothing until then).
            after_sequence: First replay the events after this sequence (0: every event the
                platform still keeps). Not with ``since``.

        Raises:
            InvalidArgument: an unknown type, both start points, or a sequence this platform
                never reached.
            Unavailable: the gateway cannot be reached or the stream broke.
        """
        request = gateway_pb2.WatchEventsRequest(types=list(types), team=team or "")
        if since is not None:
            request.since.CopyFrom(_timestamp(since))
        if after_sequence is not None:
            request.after_sequence = after_sequence
        for message in self._transport.stream(self._stub.WatchEvents, request, timeout=None):
            yield Event.from_proto(message)


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    stamp.FromDatetime(aware.astimezone(UTC))
    return stamp
