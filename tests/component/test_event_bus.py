"""The event bus against a real nats-server: outbox, relay, durable consumers, dead letters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf.message import Message
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth_common.db import Database
from plinth_common.errors import FailedPrecondition
from plinth_common.events import (
    CloudEvent,
    ConsumerSettings,
    EventBus,
    EventConsumer,
    Outbox,
    OutboxRelay,
    event_tables,
)
from plinth_common.nats_server import NatsServer

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Stack:
    """A service's event plumbing: database, outbox, relay, one consumer recording what it saw."""

    db: Database
    bus: EventBus
    outbox: Outbox
    relay: OutboxRelay
    outbox_table: sa.Table
    processed_table: sa.Table
    seen: list[tuple[CloudEvent, Message]] = field(default_factory=list)
    consumer: EventConsumer | None = None

    async def emit(self, job_id: str, team: str = "ml") -> CloudEvent:
        async with self.db.transaction() as session:
            return await self.outbox.add(
                session,
                events_pb2.JobFinished(
                    job_id=job_id, team=team, status=events_pb2.JOB_OUTCOME_SUCCEEDED
                ),
                subject=job_id,
                team=team,
            )

    async def consume(
        self, durable: str, *, fail: Exception | None = None, max_deliver: int = 3
    ) -> EventConsumer:
        async def handler(session: AsyncSession, event: CloudEvent, payload: Message) -> None:
            if fail is not None:
                raise fail
            self.seen.append((event, payload))

        self.consumer = EventConsumer(
            self.bus,
            self.db,
            self.processed_table,
            ConsumerSettings(
                durable=durable,
                subjects=["plinth.job.finished"],
                max_deliver=max_deliver,
                backoff_s=(0.05,),
            ),
            handler,
        )
        await self.consumer.start()
        return self.consumer

    async def close(self) -> None:
        if self.consumer:
            await self.consumer.stop()
        await self.relay.stop()
        await self.bus.stop()
        await self.db.close()


async def make_stack(tmp_path: Path, nats_url: str) -> Stack:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}")
    metadata = sa.MetaData()
    outbox_table, processed_table = event_tables(metadata)
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    bus = EventBus(nats_url, name="test")
    await bus.start()
    relay = OutboxRelay(db, outbox_table, bus, poll_interval_s=0.2)
    await relay.start()
    return Stack(
        db, bus, Outbox(outbox_table, source="/plinth/test"), relay, outbox_table, processed_table
    )


@pytest_asyncio.fixture(loop_scope="session")
async def stack(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Stack]:
    s = await make_stack(tmp_path, nats_server.url)
    yield s
    await s.close()


async def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_event_carries_cloudevents_headers_and_traceparent(
    stack: Stack, nats_server: NatsServer
) -> None:
    nc = await nats.connect(nats_server.url)
    received: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await nc.subscribe("plinth.job.finished", cb=received.put)
    try:
        from opentelemetry import trace

        with trace.get_tracer("test").start_as_current_span("request"):
            event = await stack.emit("j-headers")
        msg = await asyncio.wait_for(received.get(), 10)
    finally:
        await sub.unsubscribe()
        await nc.close()
    headers = msg.headers or {}
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-id"] == event.id == headers["Nats-Msg-Id"]
    assert headers["ce-type"] == "plinth.job.finished"
    assert headers["ce-source"] == "/plinth/test"
    assert headers["ce-subject"] == "j-headers"
    assert headers["ce-team"] == "ml"
    assert headers["ce-time"].endswith("Z")
    assert headers["ce-dataschema"] == "plinth.events.v1.JobFinished"
    assert headers["content-type"] == "application/protobuf"
    version, trace_id, _span_id, _flags = headers["traceparent"].split("-")
    assert version == "00"
    assert len(trace_id) == 32 and int(trace_id, 16) != 0
    payload = events_pb2.JobFinished.FromString(msg.data)
    assert payload.job_id == "j-headers" and payload.status == events_pb2.JOB_OUTCOME_SUCCEEDED


async def test_outbox_relay_consumer_delivers_each_event_once(stack: Stack) -> None:
    await stack.consume(f"c-{uuid.uuid4().hex[:8]}")
    sent = [await stack.emit(f"j-{i}") for i in range(50)]
    ids = {e.id for e in sent}
    # The session's stream also holds other tests' events: a new consumer sees those too.
    await wait_until(lambda: ids <= {e.id for e, _ in stack.seen})
    assert [e.id for e, _ in stack.seen if e.id in ids] == [e.id for e in sent]
    assert {p.job_id for _, p in stack.seen} >= {f"j-{i}" for i in range(50)}


async def test_redelivered_event_is_handled_once(stack: Stack, nats_server: NatsServer) -> None:
    consumer = await stack.consume(f"c-{uuid.uuid4().hex[:8]}")
    event = await stack.emit("j-twice")
    await wait_until(lambda: any(e.id == event.id for e, _ in stack.seen))
    # Deliver the same event again under another Nats-Msg-Id, as a producer retry after the
    # dedup window would: the consumer's processed-events table must absorb it.
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    headers = dict(event.headers())
    headers["Nats-Msg-Id"] = "retry-" + event.id
    await js.publish("plinth.job.finished", event.data, headers=headers)
    await nc.close()
    await wait_until(lambda: consumer.duplicates >= 1)
    assert sum(1 for e, _ in stack.seen if e.id == event.id) == 1


@pytest.mark.parametrize(
    ("failure", "deliveries"),
    [
        (RuntimeError("handler refuses this event"), "3"),
        (FailedPrecondition("handler refuses this event"), "1"),
    ],
    ids=["retried-then-dead", "domain-error-dead-at-once"],
)
async def test_poison_message_reaches_dead_letter_subject(
    stack: Stack, nats_server: NatsServer, failure: Exception, deliveries: str
) -> None:
    durable = f"c-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_server.url)
    dead: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await nc.subscribe("dlq.plinth.job.finished", cb=dead.put)
    consumer = await stack.consume(durable, fail=failure, max_deliver=3)
    event = await stack.emit(f"j-poison-{deliveries}")
    try:
        # Other tests' events in the session's stream are dead-lettered too: one deadline for all.
        async with asyncio.timeout(30):
            while ((msg := await dead.get()).headers or {}).get("ce-id") != event.id:
                pass
    finally:
        await sub.unsubscribe()
        await nc.close()
    headers = msg.headers or {}
    assert headers["plinth-dlq-consumer"] == durable
    assert headers["plinth-dlq-deliveries"] == deliveries
    assert "handler refuses this event" in headers["plinth-dlq-reason"]
    assert consumer.dead_lettered >= 1


async def test_outbox_keeps_events_while_nats_is_down(tmp_path: Path, own_nats: NatsServer) -> None:
    stack = await make_stack(tmp_path, own_nats.url)
    try:
        await stack.consume("c-outage")
        await stack.emit("j-before")
        await wait_until(lambda: len(stack.seen) == 1)
        await own_nats.stop(kill=True)
        during = [await stack.emit(f"j-during-{i}") for i in range(20)]  # submission still succeeds
        await asyncio.sleep(0.5)
        async with stack.db.read() as session:
            pending = (
                await session.execute(
                    sa.select(sa.func.count()).where(stack.outbox_table.c.published_at.is_(None))
                )
            ).scalar_one()
        assert pending == 20
        await own_nats.start()
        await wait_until(lambda: len(stack.seen) == 21, timeout=30)
        assert [e.id for e, _ in stack.seen[1:]] == [e.id for e in during]
    finally:
        await stack.close()
