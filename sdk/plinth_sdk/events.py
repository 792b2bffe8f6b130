"""The platform event stream and its dead letters: ``plinth.events``.

Example:
    >>> from datetime import UTC, datetime, timedelta
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     since = datetime.now(UTC) - timedelta(hours=1)
    ...     for event in plinth.events.watch(types=["job.finished"], since=since):
    ...         print(event.sequence, event.type, event.subject)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_sdk.errors import Unavailable
from plinth_sdk.models import Event, datetime_field, iso_or_none, json_object
from plinth_sdk.paging import check_page_size, paged
from plinth_sdk.transport import Transport

__all__ = ["DeadLetter", "EventsAPI", "Replayed"]

log = logging.getLogger(__name__)

#: Initial metadata of ``WatchEvents``: the watch is in place ("live"), and its resume point
#: before its first event.
_WATCH_LIVE = "plinth-watch"
_WATCH_AFTER = "plinth-watch-after"


@dataclass(frozen=True)
class DeadLetter:
    """An event a consumer gave up on.

    Attributes:
        sequence: Its place among the dead letters: what ``dead_letter`` and ``replay`` take.
        subject: The original subject (the event type), e.g. ``plinth.job.finished``.
        event_id: The event's CloudEvents id ("" if the message was no CloudEvent).
        event_type: The event's type.
        event_subject: What the event is about (a job id, a model name).
        team: The event's team, or "".
        event_time: When the event happened.
        consumer: The durable consumer that gave up on it.
        reason: Its last failure, ``"ExceptionType: message"``.
        deliveries: How many deliveries were made before it gave up.
        dead_lettered_at: When it gave up.
        data_json: The payload in proto3 JSON form ("" when it does not decode).
        data_bytes: The payload as published.
    """

    sequence: int
    subject: str
    event_id: str
    event_type: str
    event_subject: str
    team: str
    event_time: datetime | None
    consumer: str
    reason: str
    deliveries: int
    dead_lettered_at: datetime | None
    data_json: str
    data_bytes: bytes = field(repr=False)

    @property
    def data(self) -> dict[str, Any]:
        """The payload parsed from ``data_json``; {} when there is none."""
        return json_object(self.data_json)

    @classmethod
    def from_proto(cls, msg: gateway_pb2.DeadLetter) -> DeadLetter:
        """Converts a ``plinth.gateway.v1.DeadLetter`` message."""
        return cls(
            sequence=msg.sequence,
            subject=msg.subject,
            event_id=msg.event_id,
            event_type=msg.event_type,
            event_subject=msg.event_subject,
            team=msg.team,
            event_time=datetime_field(msg, "event_time"),
            consumer=msg.consumer,
            reason=msg.reason,
            deliveries=msg.deliveries,
            dead_lettered_at=datetime_field(msg, "dead_lettered_at"),
            data_json=msg.data_json,
            data_bytes=msg.data,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict with the parsed payload under ``data``."""
        return {
            "sequence": self.sequence,
            "subject": self.subject,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "event_subject": self.event_subject,
            "team": self.team,
            "event_time": iso_or_none(self.event_time),
            "consumer": self.consumer,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "dead_lettered_at": iso_or_none(self.dead_lettered_at),
            "data": self.data,
        }


@dataclass(frozen=True)
class Replayed:
    """A replayed dead letter.

    Attributes:
        dead_letter: What was replayed (no longer among the dead letters).
        event_sequence: The republished event's sequence in the event stream.
    """

    dead_letter: DeadLetter
    event_sequence: int


@dataclass
class _Resume:
    """Where a watch goes on after its stream broke: after the last event it yielded, or (none
    yet) the resume point the gateway named, or the caller's own start point."""

    since: datetime | None
    after_sequence: int | None
    #: The gateway put the current attempt's watch in place (its initial metadata arrived).
    live: bool = False
    #: Some attempt was live: a failure since is a broken stream, not a wrong address.
    was_live: bool = False

    def request(self, types: Sequence[str], team: str | None) -> gateway_pb2.WatchEventsRequest:
        request = gateway_pb2.WatchEventsRequest(types=list(types), team=team or "")
        if self.after_sequence is not None:
            request.after_sequence = self.after_sequence
        elif self.since is not None:
            request.since.CopyFrom(_timestamp(self.since))
        return request

    def named(self, metadata: Sequence[tuple[str, Any]] | None) -> None:
        for key, value in metadata or ():
            if key == _WATCH_AFTER and self.after_sequence is None:
                try:
                    self.after_sequence, self.since = int(value), None
                except ValueError:
                    log.warning("ignoring a malformed %s: %r", _WATCH_AFTER, value)

    def is_new(self, event: Event) -> bool:
        """Records ``event`` as the resume point; False for one at or before it (a repeat)."""
        if not event.sequence:  # a gateway that sends none: nothing to resume from
            return True
        if self.after_sequence is not None and event.sequence <= self.after_sequence:
            return False
        self.after_sequence, self.since = event.sequence, None
        return True


class EventsAPI:
    """The platform event stream and its dead letters: ``plinth.events``.

    Args:
        transport: The connection to the gateway.
        sleep: Waits between reconnection attempts (tests pass their own).
    """

    def __init__(
        self, transport: Transport, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._transport = transport
        self._stub = transport.stub(gateway_pb2_grpc.EventServiceStub)
        self._sleep = sleep

    def watch(
        self,
        *,
        types: Sequence[str] = (),
        team: str | None = None,
        since: datetime | None = None,
        after_sequence: int | None = None,
        reconnect: bool = True,
        reconnect_for_s: float | None = 300.0,
    ) -> Iterator[Event]:
        """Yields platform events, then follows them as they are published; the stream has no
        deadline.

        Without ``since`` or ``after_sequence`` only events published from now on come.
        Each event's ``sequence`` is its place in the platform's stream: watch again with
        ``after_sequence=`` the last one you handled to resume exactly after it.

        With ``reconnect`` (the default), a stream that breaks once it was established (the
        gateway restarted, NATS away) is opened again with a growing, jittered delay, resuming
        right after the last event yielded: no event is missed or yielded twice.

        Args:
            types: Only these types, e.g. ``"plinth.job.finished"`` or ``"job.finished"``;
                empty for all.
            team: Only this team's events; None for every team.
            since: First replay the events stored from this time on (a naive datetime is
                UTC; a future one: nothing until then).
            after_sequence: First replay the events after this sequence (0: every event the
                platform still keeps). Not with ``since``.
            reconnect: Reconnect and resume when the stream breaks; False: raise instead.
            reconnect_for_s: Give up (raise) after failing to reconnect for this long; None:
                keep trying.

        Raises:
            InvalidArgument: an unknown type, both start points, or a sequence this platform
                never reached.
            Unavailable: the gateway cannot be reached (at the first connection, or for
                longer than ``reconnect_for_s``), or the stream broke and ``reconnect`` is off.
        """
        resume = _Resume(since=since, after_sequence=after_sequence)
        failing_since: float | None = None
        delays = _delays()
        while True:
            resume.live = False
            try:
                yield from self._watch_once(types, team, resume)
                return
            except Unavailable:
                if not reconnect or not resume.was_live:
                    raise
                now = time.monotonic()
                if resume.live or failing_since is None:  # the backoff starts over
                    failing_since, delays = now, _delays()
                if reconnect_for_s is not None and now - failing_since > reconnect_for_s:
                    raise
                delay = next(delays)
                log.warning("the event stream broke; reconnecting in %.1fs", delay)
                self._sleep(delay)

    def _watch_once(
        self, types: Sequence[str], team: str | None, resume: _Resume
    ) -> Iterator[Event]:
        request = resume.request(types, team)

        def open_stream(request: gateway_pb2.WatchEventsRequest, timeout: float | None) -> Any:
            call = self._stub.WatchEvents(request, timeout=timeout)
            # The gateway sends its metadata once the watch is in place (a failed call sends
            # none and fails on the first read).
            metadata = call.initial_metadata()
            if any(key == _WATCH_LIVE for key, _ in metadata or ()):
                resume.live = resume.was_live = True
                resume.named(metadata)
            return call

        for message in self._transport.stream(open_stream, request, timeout=None):
            event = Event.from_proto(message)
            if resume.is_new(event):
                yield event

    # -- dead letters ------------------------------------------------------------------------

    def dead_letters(
        self,
        *,
        consumer: str | None = None,
        type: str | None = None,
        team: str | None = None,
        page_size: int = 50,
    ) -> Iterator[DeadLetter]:
        """Yields the dead letters, oldest first, fetching pages of ``page_size`` as needed.

        Args:
            consumer: Only those this durable consumer gave up on.
            type: Only events of this type (``job.finished`` or ``plinth.job.finished``).
            team: Only this team's events.
            page_size: Dead letters per page, 1 to 500.

        Raises:
            ValueError: a page size out of range.
        """
        check_page_size(page_size)

        def fetch(token: str) -> tuple[list[DeadLetter], str]:
            request = gateway_pb2.ListDeadLettersRequest(
                page_size=page_size,
                page_token=token,
                consumer=consumer or "",
                type=type or "",
                team=team or "",
            )
            response = self._transport.unary(self._stub.ListDeadLetters, request)
            return [DeadLetter.from_proto(d) for d in response.dead_letters], (
                response.next_page_token
            )

        return paged(fetch)

    def dead_letter(self, sequence: int) -> DeadLetter:
        """The dead letter at ``sequence``.

        Raises:
            NotFound: none there (never, or replayed already).
        """
        request = gateway_pb2.GetDeadLetterRequest(sequence=sequence)
        return DeadLetter.from_proto(self._transport.unary(self._stub.GetDeadLetter, request))

    def replay(self, sequence: int) -> Replayed:
        """Republishes the dead letter's event to its original subject and removes the dead
        letter. Consumers get it again; one that had handled it already does nothing twice.

        Raises:
            NotFound: no dead letter there (never, or replayed already).
        """
        request = gateway_pb2.ReplayDeadLetterRequest(sequence=sequence)
        response = self._transport.unary(self._stub.ReplayDeadLetter, request)
        return Replayed(
            dead_letter=DeadLetter.from_proto(response.dead_letter),
            event_sequence=response.event_sequence,
        )


def _delays() -> Iterator[float]:
    """Tenacity's jittered exponential backoff, 0.2 s growing to 5 s, as a sequence."""
    wait = wait_exponential_jitter(initial=0.2, max=5.0, jitter=0.2)
    state = RetryCallState(Retrying(), None, (), {})
    while True:
        yield wait(state)
        state.attempt_number += 1


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    stamp.FromDatetime(aware.astimezone(UTC))
    return stamp
