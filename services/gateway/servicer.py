"""gRPC servicer of the gateway's own API: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common.errors import InvalidArgument
from plinth_common.events import CloudEvent
from plinth_common.events.envelope import PROTOBUF, MalformedEvent, message_json
from plinth_common.prototime import to_timestamp
from services.gateway.service import EventStreams, StartPoint, make_start

log = logging.getLogger(__name__)

#: Initial metadata of ``WatchEvents``, sent once the subscription (with a start point: the
#: replaying consumer) is in place: a client that has it (``await call.initial_metadata()``)
#: misses no event published afterwards.
WATCH_LIVE = ("plinth-watch", "live")


def event_to_proto(event: CloudEvent, *, sequence: int = 0) -> gateway_pb2.Event:
    """CloudEvent -> ``plinth.gateway.v1.Event`` (payload both binary and JSON), with its
    stream sequence.

    Raises:
        MalformedEvent: the payload cannot be decoded.
    """
    payload = event.payload()
    return gateway_pb2.Event(
        id=event.id,
        type=event.type,
        source=event.source,
        subject=event.subject,
        time=to_timestamp(event.time),
        team=event.team,
        data_schema=event.dataschema,
        data=event.data if event.content_type.startswith(PROTOBUF) else payload.SerializeToString(),
        data_json=message_json(payload),
        traceparent=event.extensions.get("traceparent", ""),
        sequence=sequence,
    )


def start_of(request: gateway_pb2.WatchEventsRequest) -> StartPoint:
    """The request's start point (``since`` / ``after_sequence``).

    Raises:
        InvalidArgument: a timestamp out of range, or both start points set.
    """
    since: datetime | None = None
    if request.HasField("since"):
        try:
            since = request.since.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError) as exc:
            raise InvalidArgument("since", f"not a valid timestamp ({exc})") from None
    after = request.after_sequence if request.HasField("after_sequence") else None
    return make_start(since=since, after_sequence=after)


class EventServicer(gateway_pb2_grpc.EventServiceServicer):
    """Serves ``plinth.gateway.v1.EventService``."""

    def __init__(self, streams: EventStreams) -> None:
        self._streams = streams

    async def WatchEvents(
        self, request: gateway_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.Event]:
        start = start_of(request)
        async with self._streams.watch(request.types, request.team, start=start) as events:
            await context.send_initial_metadata((WATCH_LIVE,))
            async for streamed in events:
                try:
                    yield event_to_proto(streamed.event, sequence=streamed.sequence)
                except MalformedEvent as exc:  # one bad event must not end every watcher's stream
                    log.warning("skipping event %s: %s", streamed.event.id, exc)
