"""The gateway's JetStream side: platform events for the event stream, and the dead letters."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager, suppress

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, RawStreamMsg

from plinth_common.errors import Unavailable
from plinth_common.events import CloudEvent, EventBus
from plinth_common.events.bus import (
    DEAD_LETTER_PREFIX,
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
)
from plinth_common.events.envelope import MalformedEvent
from services.gateway.service import StartPoint, StoredMessage, StreamedEvent

log = logging.getLogger(__name__)


class NatsEventSource:
    """An ephemeral ordered JetStream consumer on the events stream per watcher.

    Ordered consumers need no acks, replay from any start point, deliver in stream order and
    re-create themselves from the last delivered sequence after a gap or a lost connection.
    Flow control holds the server back while a watcher is slow, so nothing is dropped.

    Args:
        bus: the gateway's NATS connection.
        inactive_threshold_s: how long the server keeps a consumer nobody listens to (a
            watcher whose gateway lost NATS for longer gets a fresh one at its resume point).
        idle_heartbeat_s: the server's heartbeat on a quiet consumer; two missed ones make the
            client re-create the consumer at its resume point.
    """

    def __init__(
        self, bus: EventBus, *, inactive_threshold_s: float = 30.0, idle_heartbeat_s: float = 5.0
    ) -> None:
        self._bus = bus
        self._inactive_threshold_s = inactive_threshold_s
        self._idle_heartbeat_s = idle_heartbeat_s

    async def last_sequence(self) -> int:
        """The stream sequence of the newest event (0: the stream is empty)."""
        js = await self._bus.connected()
        try:
            info = await js.stream_info(EVENTS_STREAM)
        except (nats.errors.Error, TimeoutError) as exc:
            raise _unreachable(exc) from None
        return info.state.last_seq

    @asynccontextmanager
    async def subscribe(
        self, *, types: frozenset[str], start: StartPoint
    ) -> AsyncIterator[AsyncIterator[StreamedEvent]]:
        """A subscription to events of ``types`` (empty: all) from ``start`` on, in place once
        entered (the consumer exists: its start is fixed).

        Raises:
            Unavailable: JetStream refused the consumer, or (on iteration) the NATS connection
                was closed.
        """
        js = await self._bus.connected()
        subject, config = _consumer_config(types, start)
        try:
            subscription = await js.subscribe(
                subject,
                stream=EVENTS_STREAM,
                config=config,
                ordered_consumer=True,
                idle_heartbeat=self._idle_heartbeat_s,
                inactive_threshold=self._inactive_threshold_s,
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise _unreachable(exc) from None
        try:
            await _seed_resume_point(subscription)
            async with aclosing(_drain(subscription)) as events:
                yield events
        finally:
            # The connection may be closing with the gateway; the server drops the consumer
            # after its inactive threshold anyway.
            with suppress(nats.errors.Error):
                await subscription.unsubscribe()


def _unreachable(exc: BaseException) -> Unavailable:
    return Unavailable(
        f"the event stream cannot be opened right now ({exc or type(exc).__name__}); watch again",
        dependency="NATS",
    )


def _consumer_config(types: frozenset[str], start: StartPoint) -> tuple[str, ConsumerConfig]:
    config = ConsumerConfig()
    if start.after_sequence is not None:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start.after_sequence + 1
    elif start.since is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = start.since
    else:
        config.deliver_policy = DeliverPolicy.NEW
    if len(types) > 1:
        config.filter_subjects = sorted(types)
    subject = next(iter(types)) if len(types) == 1 else EVENTS_SUBJECTS
    return subject, config


async def _seed_resume_point(subscription: JetStreamContext.PushSubscription) -> None:
    # nats-py re-creates an ordered consumer from the last stream sequence it delivered, which
    # it starts at 0: a gap or an outage before the first message would replay the whole stream
    # (days of events) to a watcher that asked for new ones. The consumer's own delivered
    # sequence at creation is where its start point lies; nats-py offers no public setter.
    try:
        info = await subscription.consumer_info()
    except (nats.errors.Error, TimeoutError) as exc:
        raise _unreachable(exc) from None
    jsi = getattr(subscription._sub, "_jsi", None)
    if jsi is not None and info.delivered is not None:
        jsi._sseq = max(jsi._sseq, info.delivered.stream_seq or 0)


async def _drain(
    subscription: JetStreamContext.PushSubscription,
) -> AsyncGenerator[StreamedEvent, None]:
    while True:
        try:
            msg = await subscription.next_msg(timeout=None)
        except nats.errors.ConnectionClosedError:
            raise Unavailable(
                "the gateway lost its connection to the event bus; watch again", dependency="NATS"
            ) from None
        try:
            event = CloudEvent.from_headers(msg.headers, msg.data)
        except MalformedEvent as exc:
            log.warning("skipping malformed event on %s: %s", msg.subject, exc)
            continue
        yield StreamedEvent(event=event, sequence=msg.metadata.sequence.stream)


class NatsDeadLetterStore:
    """The dead letters in the ``PLINTH_DLQ`` stream, read message by message (no consumer is
    left behind), and the events stream their replays go back to.

    Args:
        bus: the gateway's NATS connection.
    """

    prefix = DEAD_LETTER_PREFIX

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus

    async def next_message(self, after: int, *, subject: str) -> StoredMessage | None:
        """The first dead letter after ``after`` on ``subject`` (``dlq.>``: any), or None."""
        js = await self._bus.connected()
        try:
            raw = await js.get_msg(DEAD_LETTER_STREAM, seq=after + 1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise _dlq_unreachable(exc) from None
        return _stored(raw)

    async def message(self, sequence: int) -> StoredMessage | None:
        """The dead letter at ``sequence``, or None."""
        js = await self._bus.connected()
        try:
            raw = await js.get_msg(DEAD_LETTER_STREAM, seq=sequence)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise _dlq_unreachable(exc) from None
        return _stored(raw)

    async def publish(self, subject: str, headers: Mapping[str, str], data: bytes) -> int:
        """Publishes to the events stream; the stored sequence."""
        js = await self._bus.connected()
        try:
            ack = await js.publish(subject, data, headers=dict(headers), stream=EVENTS_STREAM)
        except (nats.errors.Error, TimeoutError) as exc:
            raise _dlq_unreachable(exc) from None
        return ack.seq

    async def remove(self, sequence: int) -> None:
        """Deletes the dead letter at ``sequence`` (gone already: nothing to do)."""
        js = await self._bus.connected()
        try:
            await js.delete_msg(DEAD_LETTER_STREAM, sequence)
        except nats.js.errors.NotFoundError:
            return
        except (nats.errors.Error, TimeoutError) as exc:
            raise _dlq_unreachable(exc) from None


def _stored(raw: RawStreamMsg) -> StoredMessage:
    return StoredMessage(
        sequence=raw.seq or 0,
        subject=raw.subject or "",
        headers={str(k): str(v) for k, v in (raw.headers or {}).items()},
        data=raw.data or b"",
        stored_at=raw.time,
    )


def _dlq_unreachable(exc: BaseException) -> Unavailable:
    return Unavailable(
        f"the dead letters cannot be read right now ({exc or type(exc).__name__}); retry",
        dependency="NATS",
    )
