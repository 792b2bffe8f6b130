"""gRPC servicer of the gateway's own API: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import suppress

import grpc

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common.auth import current_principal, require
from plinth_common.auth.permissions import EVENTS_WATCH
from plinth_common.events import CloudEvent
from plinth_common.events.envelope import PROTOBUF, MalformedEvent, message_json
from plinth_common.prototime import from_timestamp, to_timestamp
from services.gateway.service import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetters,
    EventStreams,
    StartPoint,
    make_start,
)

log = logging.getLogger(__name__)

#: Initial metadata of ``WatchEvents``, sent once the subscription (with a start point: the
#: replaying consumer) is in place: a client that has it (``await call.initial_metadata()``)
#: misses no event published afterwards.
WATCH_LIVE = ("plinth-watch", "live")
#: Initial metadata of ``WatchEvents`` naming its resume point before any event arrives.
WATCH_AFTER = "plinth-watch-after"


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
    since = from_timestamp(request.since, "since") if request.HasField("since") else None
    after = request.after_sequence if request.HasField("after_sequence") else None
    return make_start(since=since, after_sequence=after)


def dead_letter_to_proto(letter: DeadLetter) -> gateway_pb2.DeadLetter:
    """Domain dead letter -> ``plinth.gateway.v1.DeadLetter`` (JSON payload when it decodes)."""
    message = gateway_pb2.DeadLetter(
        sequence=letter.sequence,
        subject=letter.subject,
        event_id=letter.event_id,
        event_type=letter.event_type,
        team=letter.team,
        consumer=letter.consumer,
        reason=letter.reason,
        deliveries=letter.deliveries,
        data=letter.data,
    )
    if letter.dead_lettered_at is not None:
        message.dead_lettered_at.CopyFrom(to_timestamp(letter.dead_lettered_at))
    event = letter.event()
    if event is not None:
        message.event_subject = event.subject
        message.event_time.CopyFrom(to_timestamp(event.time))
        # The payload may be why it was dead-lettered: its bytes are in `data` anyway.
        with suppress(MalformedEvent):
            message.data_json = message_json(event.payload())
    return message


class EventServicer(gateway_pb2_grpc.EventServiceServicer):
    """Serves ``plinth.gateway.v1.EventService``.

    A watcher gets only the events of its teams (admins: all; events that name no team: admins
    only). The dead letters can hold any team's event: the authorization table makes them
    admin-only, checked by the gateway's auth interceptor before these methods run.

    Args:
        streams: the event streams.
        dead_letters: the dead letters.
    """

    def __init__(self, streams: EventStreams, dead_letters: DeadLetters) -> None:
        self._streams = streams
        self._dead_letters = dead_letters

    async def WatchEvents(
        self, request: gateway_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.Event]:
        caller = current_principal()
        if request.team:
            # Another team's events: NOT_FOUND team, as every list filtered by it answers.
            require(caller, EVENTS_WATCH, request.team, kind="team", name=request.team)
        start = await self._streams.pin(start_of(request))
        async with self._streams.watch(
            request.types, request.team, start=start, visible=caller.visible_teams()
        ) as events:
            metadata = [WATCH_LIVE]
            if start.after_sequence is not None:
                metadata.append((WATCH_AFTER, str(start.after_sequence)))
            await context.send_initial_metadata(tuple(metadata))
            async for streamed in events:
                try:
                    yield event_to_proto(streamed.event, sequence=streamed.sequence)
                except MalformedEvent as exc:  # one bad event must not end every watcher's stream
                    log.warning("skipping event %s: %s", streamed.event.id, exc)

    async def ListDeadLetters(
        self, request: gateway_pb2.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListDeadLettersResponse:
        letters, token = await self._dead_letters.list(
            page_size=request.page_size,
            page_token=request.page_token,
            where=DeadLetterFilter(consumer=request.consumer, type=request.type, team=request.team),
        )
        return gateway_pb2.ListDeadLettersResponse(
            dead_letters=[dead_letter_to_proto(letter) for letter in letters],
            next_page_token=token,
        )

    async def GetDeadLetter(
        self, request: gateway_pb2.GetDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.DeadLetter:
        return dead_letter_to_proto(await self._dead_letters.get(request.sequence))

    async def ReplayDeadLetter(
        self, request: gateway_pb2.ReplayDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ReplayDeadLetterResponse:
        replayed = await self._dead_letters.replay(request.sequence)
        return gateway_pb2.ReplayDeadLetterResponse(
            dead_letter=dead_letter_to_proto(replayed.dead_letter),
            event_sequence=replayed.event_sequence,
        )
