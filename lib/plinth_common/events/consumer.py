"""Durable JetStream pull consumers with idempotent handling and dead letters.

Two kinds of handler, chosen by what their side effect is:

- a database-only :data:`Handler` ``(session, event, payload)`` runs inside the transaction
  that records the event id in ``processed_events``, so its writes and that record commit
  together;
- an :class:`EffectHandler` does I/O (another engine, another service). Its
  :meth:`~EffectHandler.perform` runs with no transaction open and returns a :data:`Record`;
  one short transaction then records the event id and runs the record (typically adding the
  outbox events that report the effect). No write lock is held while the I/O waits.

For each message the consumer opens a CONSUMER span under the producer's trace context and
acks after the commit. A fetched batch commits in ONE transaction (one commit instead of one
per message); if it fails, each message is committed on its own, so the culprit is retried or
dead-lettered alone and handlers must tolerate a re-run after a rollback, as they must for any
redelivery. A duplicate delivery finds its id recorded: a database-only handler does not run
(the insert of the id returns nothing), an effect handler's :meth:`~EffectHandler.perform` is
not called (the id is looked up first, outside any transaction). An effect must still be
idempotent: a crash between the effect and the commit performs it again on redelivery.

A domain error other than Unavailable, or a malformed event, is dead-lettered at once. Any
other failure is retried with backoff; after ``max_deliver`` deliveries the message goes to
``dlq.<subject>`` with the reason in its headers, and is acked.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypedDict

import nats.errors
import nats.js.errors
import sqlalchemy as sa
from google.protobuf.message import Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from plinth_common.db import Database
from plinth_common.errors import PlinthError, Unavailable
from plinth_common.events.bus import DEAD_LETTER_PREFIX, EVENTS_STREAM, EventBus
from plinth_common.events.envelope import CloudEvent, MalformedEvent
from plinth_common.events.tracing import extract
from plinth_common.metrics import (
    EVENTS_DEAD_LETTERS,
    EVENTS_HANDLE_LAG,
    EVENTS_REDELIVERIES,
    Metrics,
    observe,
)

__all__ = [
    "ConsumerOptions",
    "ConsumerSettings",
    "EffectHandler",
    "EventConsumer",
    "Handler",
    "Record",
]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("plinth.events")

#: A database-only handler: runs in the transaction that records the event as processed.
Handler = Callable[[AsyncSession, CloudEvent, Message], Awaitable[None]]
#: What an effect leaves to write: runs in the short transaction that records the event.
Record = Callable[[AsyncSession], Awaitable[None]]


class EffectHandler(ABC):
    """A handler whose side effect is I/O rather than SQL (an engine, another service).

    The consumer calls :meth:`perform` with no transaction open, then records the event as
    processed in one short transaction that also runs the returned :data:`Record`.
    """

    @abstractmethod
    async def perform(self, event: CloudEvent, payload: Message) -> Record | None:
        """Does the effect; returns what to write with the processed-event row (or None).

        It must be idempotent (a redelivery after a crash before the commit runs it again).
        Raising means "retry"; a domain error other than Unavailable means "dead letter".
        """


@dataclass(frozen=True, kw_only=True)
class ConsumerSettings:
    """How one durable consumer behaves.

    Attributes:
        durable: the consumer's durable name (also the key in ``processed_events``).
        subjects: subjects it handles, e.g. ``["plinth.job.finished"]``.
        max_deliver: deliveries before a message goes to the dead-letter subject.
        backoff_s: delay before each redelivery (the last value repeats).
        unavailable_max_age_s: a message whose handler fails with
            :class:`~plinth_common.errors.Unavailable` (a dependency is down) is retried, not
            counted toward ``max_deliver``, until it is this old: an outage is not a poison
            message.
        ack_wait_s: how long the server waits for an ack before redelivering.
        batch: messages fetched per pull.
    """

    durable: str
    subjects: Sequence[str]
    max_deliver: int = 5
    backoff_s: Sequence[float] = (0.2, 1.0, 5.0, 15.0)
    unavailable_max_age_s: float = 600.0
    ack_wait_s: float = 60.0
    batch: int = 64

    def backoff_for(self, delivery: int) -> float:
        """The delay before delivery number ``delivery + 1``."""
        return self.backoff_s[min(delivery - 1, len(self.backoff_s) - 1)]


class ConsumerOptions(TypedDict, total=False):
    """The optional fields of :class:`ConsumerSettings`, as keyword arguments."""

    max_deliver: int
    backoff_s: Sequence[float]
    unavailable_max_age_s: float
    ack_wait_s: float
    batch: int


@dataclass(eq=False)
class _Delivery:
    """One fetched, well-formed message on its way through a batch."""

    msg: Msg
    span: Span
    event: CloudEvent
    payload: Message
    record: Record | None = None


class EventConsumer:
    """Runs one durable consumer against one handler.

    Args:
        bus: the NATS connection.
        db: the service's database, where ``processed_events`` lives.
        processed: the service's ``processed_events`` table.
        settings: the consumer's settings.
        handler: a database-only :data:`Handler` ``async (session, event, payload) -> None``,
            or an :class:`EffectHandler`.
        metrics: where to record redeliveries, dead letters and the publish-to-handle lag.
    """

    def __init__(
        self,
        bus: EventBus,
        db: Database,
        processed: Table,
        settings: ConsumerSettings,
        handler: Handler | EffectHandler,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._bus = bus
        self._db = db
        self._processed = processed
        self.settings = settings
        self._handler = handler
        self._task: asyncio.Task[None] | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None
        self.handled = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self._lag = metrics.histogram(EVENTS_HANDLE_LAG) if metrics else None
        self._redeliveries = (
            metrics.counter(EVENTS_REDELIVERIES).labels(settings.durable) if metrics else None
        )
        self._dead_letters = (
            metrics.counter(EVENTS_DEAD_LETTERS).labels(settings.durable) if metrics else None
        )

    async def start(self) -> None:
        """Starts pulling in the background (once NATS is connected)."""
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.settings.durable}")

    async def stop(self) -> None:
        """Stops pulling; an unacked message is redelivered later."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._subscription is not None:
            # An open pull subscription makes the connection's drain wait and then complain.
            with suppress(Exception):  # the connection may already be gone
                await self._subscription.unsubscribe()
            self._subscription = None

    # -- pulling ------------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._bus.connected()
        # NATS down or reconnecting, the consumer deleted: try again with a jittered backoff
        # that starts over after each successful pull.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential_jitter(initial=0.2, max=5.0, jitter=0.2),
            before_sleep=self._before_retry,
            reraise=True,
        )
        while True:
            await retrying(self._pull_once)

    def _before_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, nats.js.errors.NotFoundError):
            log.warning(
                "consumer %s vanished (server restarted without its state?); recreating",
                self.settings.durable,
            )
            self._subscription = None
            return
        log.warning("consumer %s: %s", self.settings.durable, exc or type(exc).__name__)

    async def _pull_once(self) -> None:
        if self._subscription is None:
            await self._ensure_consumer()
            self._subscription = await self._bus.js.pull_subscribe_bind(
                durable=self.settings.durable, stream=EVENTS_STREAM
            )
        try:
            messages = await self._subscription.fetch(self.settings.batch, timeout=1.0)
        except (nats.errors.TimeoutError, TimeoutError):
            return
        await self._process_batch(messages)

    async def _ensure_consumer(self) -> None:
        s = self.settings
        config = ConsumerConfig(
            durable_name=s.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.ack_wait_s,
            # The server must keep redelivering until we dead-letter the message ourselves.
            max_deliver=-1,
            max_ack_pending=max(1000, s.batch * 4),
            filter_subjects=list(s.subjects) if len(s.subjects) > 1 else None,
            filter_subject=s.subjects[0] if len(s.subjects) == 1 else None,
        )
        await self._bus.js.add_consumer(EVENTS_STREAM, config)

    # -- processing ---------------------------------------------------------------------------

    async def _process_batch(self, messages: Sequence[Msg]) -> None:
        """Parses, performs (effect handlers, no transaction open), commits once, acks."""
        spans: list[Span] = []
        try:
            deliveries: list[_Delivery] = []
            for msg in messages:
                if self._redeliveries is not None and (msg.metadata.num_delivered or 1) > 1:
                    self._redeliveries.inc()
                spans.append(span := self._start_span(msg))
                try:
                    event = CloudEvent.from_headers(msg.headers or {}, msg.data)
                    deliveries.append(_Delivery(msg, span, event, event.payload()))
                except MalformedEvent as exc:
                    await self._fail(msg, span, exc)
            ready = await self._perform_all(deliveries)
            if ready:
                await self._commit(ready)
        finally:
            for span in spans:
                span.end()

    async def _perform_all(self, deliveries: list[_Delivery]) -> list[_Delivery]:
        """Gives each delivery its record; returns those to commit (failures are retrying)."""
        handler = self._handler
        if not isinstance(handler, EffectHandler):
            for d in deliveries:
                d.record = _in_transaction(handler, d.event, d.payload)
            return deliveries
        try:
            done = await self._recorded([d.event.id for d in deliveries])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store is down: retry each message later
            for d in deliveries:
                await self._fail(d.msg, d.span, exc)
            return []
        # The same id twice in one batch performs once; both copies share its record.
        performed: dict[str, Record | None] = {}
        ready: list[_Delivery] = []
        for d in deliveries:
            if d.event.id not in done and d.event.id not in performed:
                try:
                    with _current(d.span):
                        performed[d.event.id] = await handler.perform(d.event, d.payload)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure is a retry, then a dead letter
                    await self._fail(d.msg, d.span, exc)
                    continue
            # An id recorded already has no record: its commit acks it as a duplicate.
            d.record = performed.get(d.event.id)
            ready.append(d)
        return ready

    async def _commit(self, deliveries: list[_Delivery]) -> None:
        """One transaction records the ids and runs the records of the new ones; then acks.

        If it fails, a batch is committed message by message to isolate the culprit, which is
        retried or dead-lettered.
        """
        try:
            handled = await self._record_all(deliveries)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the failing message, then retry it
            if len(deliveries) > 1:
                for d in deliveries:
                    await self._commit([d])
            else:
                await self._fail(deliveries[0].msg, deliveries[0].span, exc)
            return
        for d in deliveries:
            if d not in handled:
                d.span.set_attribute("plinth.duplicate", True)
        self.handled += len(handled)
        self.duplicates += len(deliveries) - len(handled)
        if self._lag is not None:
            now = datetime.now(UTC)
            for d in handled:
                with _current(d.span):  # the exemplar is the event's trace
                    observe(self._lag.labels(d.msg.subject), (now - d.event.time).total_seconds())
        for d in deliveries:
            await d.msg.ack()

    async def _record_all(self, deliveries: list[_Delivery]) -> set[_Delivery]:
        handled: set[_Delivery] = set()
        async with self._db.transaction() as session:
            fresh = await self._first_times(session, [d.event.id for d in deliveries])
            for d in deliveries:
                if d.event.id not in fresh:
                    continue
                fresh.discard(d.event.id)  # the same id twice in one batch runs once
                if d.record is not None:
                    with _current(d.span):
                        await d.record(session)
                handled.add(d)
        return handled

    async def _first_times(self, session: AsyncSession, event_ids: Sequence[str]) -> set[str]:
        """Records the ids in one INSERT .. ON CONFLICT DO NOTHING RETURNING; returns those that were new."""
        now = datetime.now(UTC)
        dialect = sqlite if self._db.is_sqlite else postgresql
        statement = (
            dialect.insert(self._processed)
            .on_conflict_do_nothing()
            .returning(self._processed.c.event_id)
        )
        rows = [
            {"consumer": self.settings.durable, "event_id": event_id, "processed_at": now}
            for event_id in event_ids
        ]
        return set((await session.execute(statement, rows)).scalars())

    async def _recorded(self, event_ids: Sequence[str]) -> set[str]:
        """The ids already recorded as processed (a read: takes no write lock)."""
        table = self._processed
        async with self._db.read() as session:
            found = await session.execute(
                sa.select(table.c.event_id).where(
                    table.c.consumer == self.settings.durable,
                    table.c.event_id.in_(set(event_ids)),
                )
            )
            return set(found.scalars())

    def _start_span(self, msg: Msg) -> Span:
        headers = msg.headers or {}
        return tracer.start_span(
            f"{msg.subject} process",
            context=extract(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.consumer.group.name": self.settings.durable,
                "messaging.message.id": headers.get("ce-id", ""),
                "messaging.operation.type": "process",
            },
        )

    # -- failures -----------------------------------------------------------------------------

    async def _fail(self, msg: Msg, span: Span, exc: Exception) -> None:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
        await self._retry_or_dead_letter(msg, exc)

    async def _retry_or_dead_letter(self, msg: Msg, exc: Exception) -> None:
        delivery = msg.metadata.num_delivered or 1
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        if isinstance(exc, Unavailable) and self._within_outage_budget(msg):
            delay = max(self.settings.backoff_for(delivery), exc.retry_after_s or 0.0)
            log.warning(
                "%s delivery %d: %s; retrying in %.1fs", msg.subject, delivery, reason, delay
            )
            await msg.nak(delay=min(delay, max(self.settings.backoff_s)))
            return
        if delivery < self.settings.max_deliver and _retryable(exc):
            log.warning("%s delivery %d failed (%s); retrying", msg.subject, delivery, reason)
            await msg.nak(delay=self.settings.backoff_for(delivery))
            return
        headers = dict(msg.headers or {})
        headers.update(
            {
                "plinth-dlq-reason": reason,
                "plinth-dlq-consumer": self.settings.durable,
                "plinth-dlq-deliveries": str(delivery),
                "plinth-dlq-subject": msg.subject,
            }
        )
        # A new message id (not the original's, which JetStream would drop as a duplicate); a
        # crash between this publish and the ack re-publishes the same id, which is dropped.
        headers["Nats-Msg-Id"] = f"{headers.get('ce-id', msg.reply)}:{self.settings.durable}"
        await self._bus.js.publish(DEAD_LETTER_PREFIX + msg.subject, msg.data, headers=headers)
        await msg.ack()
        self.dead_lettered += 1
        if self._dead_letters is not None:
            self._dead_letters.inc()
        log.error("%s dead-lettered after %d deliveries: %s", msg.subject, delivery, reason)

    def _within_outage_budget(self, msg: Msg) -> bool:
        """Whether a message whose dependency is down is young enough to keep waiting."""
        # JetStream's ack subject carries the time the stream stored the message.
        age = (datetime.now(UTC) - msg.metadata.timestamp).total_seconds()
        return age < self.settings.unavailable_max_age_s


def _in_transaction(handler: Handler, event: CloudEvent, payload: Message) -> Record:
    """A database-only handler as the record of an effect that has nothing to do outside."""

    async def record(session: AsyncSession) -> None:
        await handler(session, event, payload)

    return record


def _current(span: Span) -> AbstractContextManager[Span]:
    """Makes ``span`` current (for child spans and the outbox's trace context), leaving its
    ending and its error status to the consumer: a failed batch commit may succeed alone."""
    return trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )


def _retryable(exc: Exception) -> bool:
    """A domain error other than Unavailable (bad input, wrong state, not allowed) fails the same
    way on every delivery: it goes to the dead-letter subject at once instead of being retried."""
    return not isinstance(exc, (PlinthError, MalformedEvent)) or isinstance(exc, Unavailable)
