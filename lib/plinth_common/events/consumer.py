"""Durable JetStream pull consumers with idempotent, transactional handling and dead letters.

For each message: open a CONSUMER span under the producer's trace context, then in one SQL
transaction record the event id in ``processed_events`` and run the handler; ack after the
commit. A domain error other than Unavailable, or a malformed event, is dead-lettered at once.
A fetched batch shares one transaction (one commit instead of one per message); if any
handler in it fails, the batch rolls back and is replayed one message per transaction, so
handlers must tolerate a re-run after a rollback, as they must for any redelivery. A duplicate delivery finds its id recorded and is acked without running the handler.
A failing handler is retried with backoff; after ``max_deliver`` deliveries the message goes to
``dlq.<subject>`` with the reason in its headers, and is acked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from plinth_common.db import Database
from plinth_common.errors import PlinthError, Unavailable
from plinth_common.events.bus import DEAD_LETTER_PREFIX, EVENTS_STREAM, EventBus
from plinth_common.events.envelope import CloudEvent, MalformedEvent
from plinth_common.events.tracing import extract

log = logging.getLogger(__name__)
tracer = trace.get_tracer("plinth.events")

Handler = Callable[[AsyncSession, CloudEvent, Message], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class ConsumerSettings:
    """How one durable consumer behaves.

    Attributes:
        durable: the consumer's durable name (also the key in ``processed_events``).
        subjects: subjects it handles, e.g. ``["plinth.job.finished"]``.
        max_deliver: deliveries before a message goes to the dead-letter subject.
        backoff_s: delay before each redelivery (the last value repeats).
        ack_wait_s: how long the server waits for an ack before redelivering.
        batch: messages fetched per pull.
    """

    durable: str
    subjects: Sequence[str]
    max_deliver: int = 5
    backoff_s: Sequence[float] = (0.2, 1.0, 5.0, 15.0)
    ack_wait_s: float = 60.0
    batch: int = 64

    def backoff_for(self, delivery: int) -> float:
        """The delay before delivery number ``delivery + 1``."""
        return self.backoff_s[min(delivery - 1, len(self.backoff_s) - 1)]


class EventConsumer:
    """Runs one durable consumer against one handler.

    Args:
        bus: the NATS connection.
        db: the service's database, in whose transaction the handler runs.
        processed: the service's ``processed_events`` table.
        settings: the consumer's settings.
        handler: ``async (session, event, payload) -> None``; raising means "retry".
    """

    def __init__(
        self,
        bus: EventBus,
        db: Database,
        processed: Table,
        settings: ConsumerSettings,
        handler: Handler,
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
            try:
                await self._subscription.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may already be gone
                pass
            self._subscription = None

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

    async def _run(self) -> None:
        await self._bus.connected()
        while True:
            try:
                if self._subscription is None:
                    await self._ensure_consumer()
                    self._subscription = await self._bus.js.pull_subscribe_bind(
                        durable=self.settings.durable, stream=EVENTS_STREAM
                    )
                try:
                    messages = await self._subscription.fetch(self.settings.batch, timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                await self._process_batch(messages)
            except asyncio.CancelledError:
                raise
            except nats.js.errors.NotFoundError:
                log.warning(
                    "consumer %s vanished (server restarted without its state?); recreating",
                    self.settings.durable,
                )
                self._subscription = None
                await asyncio.sleep(0.5)
            except Exception as exc:  # noqa: BLE001 - NATS down, reconnecting: try again
                log.warning("consumer %s: %s", self.settings.durable, exc or type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _process_batch(self, messages: list[Msg]) -> None:
        """A fetched batch in ONE transaction: record every id (one statement), run the handlers of
        the new ones, commit once, then ack. Any failure rolls the whole batch back and replays it
        one message per transaction (:meth:`_process`), which retries or dead-letters the culprit.
        """
        if len(messages) == 1:
            await self._process(messages[0])
            return
        handled = duplicates = 0
        try:
            items = []
            for msg in messages:
                event = CloudEvent.from_headers(msg.headers or {}, msg.data)
                items.append((msg, event, event.payload()))
            async with self._db.transaction() as session:
                fresh = await self._first_times(session, [event.id for _, event, _ in items])
                for msg, event, payload in items:
                    with self._span(msg) as span:
                        if event.id in fresh:
                            fresh.discard(event.id)  # the same id twice in one batch runs once
                            await self._handler(session, event, payload)
                            handled += 1
                        else:
                            duplicates += 1
                            span.set_attribute("plinth.duplicate", True)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - isolate the failing message on the one-by-one path
            for msg in messages:
                await self._process(msg)
            return
        self.handled += handled
        self.duplicates += duplicates
        for msg, _, _ in items:
            await msg.ack()

    def _span(self, msg: Msg) -> AbstractContextManager[Span]:
        headers = msg.headers or {}
        return tracer.start_as_current_span(
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

    async def _process(self, msg: Msg) -> None:
        headers = msg.headers or {}
        with self._span(msg) as span:
            try:
                event = CloudEvent.from_headers(headers, msg.data)
                payload = event.payload()
                async with self._db.transaction() as session:
                    if await self._first_time(session, event.id):
                        await self._handler(session, event, payload)
                        self.handled += 1
                    else:
                        self.duplicates += 1
                        span.set_attribute("plinth.duplicate", True)
                await msg.ack()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is a retry, then a dead letter
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                await self._retry_or_dead_letter(msg, exc)

    async def _first_time(self, session: AsyncSession, event_id: str) -> bool:
        return event_id in await self._first_times(session, [event_id])

    async def _retry_or_dead_letter(self, msg: Msg, exc: Exception) -> None:
        delivery = msg.metadata.num_delivered or 1
        reason = f"{type(exc).__name__}: {exc}"[:1000]
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
        log.error("%s dead-lettered after %d deliveries: %s", msg.subject, delivery, reason)


def _retryable(exc: Exception) -> bool:
    """A domain error other than Unavailable (bad input, wrong state, not allowed) fails the same
    way on every delivery: it goes to the dead-letter subject at once instead of being retried."""
    return not isinstance(exc, (PlinthError, MalformedEvent)) or isinstance(exc, Unavailable)
