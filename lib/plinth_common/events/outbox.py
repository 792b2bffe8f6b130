"""Transactional outbox: events commit with the state change, a relay publishes them later.

Nothing is lost while NATS is down: rows stay unpublished until JetStream acknowledges them.
A row may be published twice (a crash between the ack and the mark); JetStream drops the
second copy because ``Nats-Msg-Id`` equals ``ce-id``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from plinth_common.db import Database
from plinth_common.events.bus import EventBus
from plinth_common.events.envelope import PROTOBUF, CloudEvent, new_event
from plinth_common.events.tracing import extract, inject, traceparent_of_current
from plinth_common.metrics import EVENTS_OUTBOX_BACKLOG, EVENTS_PUBLISHED, Metrics

log = logging.getLogger(__name__)
tracer = trace.get_tracer("plinth.events")
OUTBOX_WRITTEN = "plinth.outbox_written"  # session.info key: this transaction added events


class Outbox:
    """Adds events to the outbox table inside the caller's transaction.

    Args:
        table: the service's ``event_outbox`` table.
        source: the CloudEvents source of this service, e.g. ``/plinth/scheduler``.
        content_type: ``application/protobuf`` (default) or ``application/json``.
    """

    def __init__(self, table: Table, *, source: str, content_type: str = PROTOBUF) -> None:
        self._table = table
        self._source = source
        self._content_type = content_type

    async def add(
        self, session: AsyncSession, message: Message, *, subject: str, team: str = ""
    ) -> CloudEvent:
        """Records ``message`` as an event; it is published after the transaction commits.

        The current trace context travels with the row, so the publication joins the trace of
        the request that caused it.
        """
        event = new_event(
            message,
            source=self._source,
            subject=subject,
            team=team,
            content_type=self._content_type,
            extensions=traceparent_of_current(),
        )
        session.info[OUTBOX_WRITTEN] = True
        await session.execute(
            sa.insert(self._table).values(
                event_id=event.id,
                subject=event.type,
                headers=event.headers(),
                data=event.data,
                created_at=event.time,
            )
        )
        return event


class OutboxRelay:
    """Publishes committed outbox rows to JetStream, in order, and marks them published.

    Args:
        db: the service's database (its commits wake the relay).
        table: the ``event_outbox`` table.
        bus: the NATS connection.
        batch_size: rows published concurrently per round.
        poll_interval_s: how often to look without a wake-up (rows of other processes, restarts).
        publish_timeout_s: how long one publish waits for JetStream's acknowledgement.
        metrics: where to count publications and show the backlog
            (``plinth_events_published_total``, ``plinth_events_outbox_backlog``).
    """

    def __init__(
        self,
        db: Database,
        table: Table,
        bus: EventBus,
        *,
        batch_size: int = 256,
        poll_interval_s: float = 1.0,
        publish_timeout_s: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self._table = table
        self._bus = bus
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._publish_timeout_s = publish_timeout_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self._published_total = metrics.counter(EVENTS_PUBLISHED) if metrics else None
        self._backlog = metrics.gauge(EVENTS_OUTBOX_BACKLOG).labels() if metrics else None
        self._backlog_task: asyncio.Task[None] | None = None
        self._backlog_known_at = 0.0
        db.on_commit(self._after_commit)

    def wake(self) -> None:
        """Asks the relay to look at the outbox now."""
        self._wake.set()

    def _after_commit(self, info: Mapping[str, Any]) -> None:
        if info.get(OUTBOX_WRITTEN):
            self._wake.set()

    async def start(self) -> None:
        """Starts the relay loop."""
        self._task = asyncio.create_task(self._run(), name="outbox-relay")
        if self._backlog is not None:
            self._backlog_task = asyncio.create_task(self._watch_backlog(), name="outbox-backlog")

    async def stop(self) -> None:
        """Publishes what it can within a second, then stops."""
        if self._task is None:
            return
        if self._bus.is_connected:
            with suppress(Exception):  # rows stay in the outbox for the next start
                await asyncio.wait_for(self.drain(), timeout=1.0)
        for task in (self._task, self._backlog_task):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._backlog_task) if t is not None), return_exceptions=True
        )

    async def _watch_backlog(self) -> None:
        """Counts the unpublished rows while the relay cannot: before NATS first connects and
        while publishing fails. A healthy relay looks at least every poll interval and sets the
        backlog itself, so this costs no query then."""
        while True:
            await asyncio.sleep(self._poll_interval_s)
            if time.monotonic() - self._backlog_known_at < 2 * self._poll_interval_s:
                continue
            with suppress(Exception):  # the store is busy or gone: try again next period
                async with self._db.read() as session:
                    count = await session.scalar(
                        sa.select(sa.func.count())
                        .select_from(self._table)
                        .where(self._table.c.published_at.is_(None))
                    )
                self._set_backlog(int(count or 0))

    def _set_backlog(self, rows: int) -> None:
        if self._backlog is not None:
            self._backlog.set(rows)
            self._backlog_known_at = time.monotonic()

    async def _run(self) -> None:
        await self._bus.connected()
        # NATS down, the database busy: retry with a jittered backoff that starts over after
        # each drained outbox.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential_jitter(initial=0.1, max=5.0, jitter=0.1),
            before_sleep=_log_retry,
            reraise=True,
        )
        while True:
            await retrying(self.drain)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_interval_s)

    async def drain(self) -> None:
        """Publishes every unpublished row."""
        while await self.drain_once():
            pass

    async def drain_once(self) -> int:
        """Publishes one batch of unpublished rows; returns how many were published."""
        self._wake.clear()
        async with self._db.read() as session:
            rows = (
                await session.execute(
                    sa.select(
                        self._table.c.seq,
                        self._table.c.subject,
                        self._table.c.headers,
                        self._table.c.data,
                    )
                    .where(self._table.c.published_at.is_(None))
                    .order_by(self._table.c.seq)
                    .limit(self._batch_size)
                )
            ).all()
        if not rows:
            self._set_backlog(0)
            return 0
        # The first publish goes alone: nats-py sets up its reply subscription on a connection's
        # first request, and concurrent first requests could otherwise overtake each other.
        results: list[BaseException | None] = []
        try:
            await self._publish(rows[0].subject, rows[0].headers, rows[0].data)
            results.append(None)
            results += await asyncio.gather(
                *(self._publish(r.subject, r.headers, r.data) for r in rows[1:]),
                return_exceptions=True,
            )
        except Exception as exc:  # noqa: BLE001 - the first publish failed: nothing is marked
            results.append(exc)
        # Mark the unbroken prefix that JetStream acknowledged, so order holds across retries.
        done: list[int] = []
        failure: BaseException | None = None
        for row, result in zip(rows, results, strict=False):  # results stop at a failed first
            if isinstance(result, BaseException):
                failure = result
                break
            done.append(row.seq)
        if done:
            async with self._db.sessions() as session, session.begin():
                await session.execute(
                    sa.update(self._table)
                    .where(self._table.c.seq.in_(done))
                    .values(published_at=datetime.now(UTC))
                )
            self.published += len(done)
            if self._published_total is not None:
                for subject, n in Counter(r.subject for r in rows[: len(done)]).items():
                    self._published_total.labels(subject).inc(n)
        if failure is None and len(rows) < self._batch_size:
            # Everything unpublished was in this batch (later commits wake the relay again).
            self._set_backlog(0)
        if failure is not None:
            raise failure
        return len(done)

    async def _publish(self, subject: str, stored_headers: Mapping[str, Any], data: bytes) -> None:
        headers = {k: str(v) for k, v in stored_headers.items()}
        with tracer.start_as_current_span(
            f"{subject} publish",
            context=extract(headers),
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": subject,
                "messaging.message.id": headers.get("ce-id", ""),
                "messaging.operation.type": "publish",
            },
        ):
            inject(headers)
            await self._bus.js.publish(
                subject, data, headers=headers, timeout=self._publish_timeout_s
            )


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("outbox relay: %s; retrying in %.1fs", exc or type(exc).__name__, delay)
