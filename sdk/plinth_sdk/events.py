"""The platform event stream: ``plinth.events``.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     for event in plinth.events.watch(types=["job.finished"]):
    ...         print(event.type, event.subject)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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

    def watch(self, *, types: Sequence[str] = (), team: str | None = None) -> Iterator[Event]:
        """Yields platform events as they are published from now on; the stream has no
        deadline.

        Args:
            types: Only these types, e.g. ``"plinth.job.finished"`` or ``"job.finished"``;
                empty for all.
            team: Only this team's events; None for every team.

        Raises:
            Unavailable: the gateway cannot be reached or the stream broke.
        """
        request = gateway_pb2.WatchEventsRequest(types=list(types), team=team or "")
        for message in self._transport.stream(self._stub.WatchEvents, request, timeout=None):
            yield Event.from_proto(message)
