"""The event consumer against a real nats-server of each test's own and a SQLite store: effect
handlers do their I/O with no write transaction open, duplicates have one effect, failures are
retried and then dead-lettered, database-only handlers commit a batch at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf.message import Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth_common.db import Database
from plinth_common.errors import FailedPrecondition, Unavailable
from plinth_common.events import (
    CloudEvent,
    ConsumerSettings,
    EffectHandler,
    EventBus,
    EventConsumer,
    Handler,
    Outbox,
    Record,
    event_tables,
    new_event,
)
from plinth_common.nats_server import NatsServer
from tests.helpers import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")

SUBJECT = "plinth.job.finished"


def can_write(path: Path) -> bool:
    """True when another connection can take SQLite's write lock (and write) within 0.2 s."""
    connection = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("INSERT INTO probe (note) VALUES ('written beside the consumer')")
        connection.execute("COMMIT")
        return True
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        return False
    finally:
        connection.close()


@dataclass
class Store:
    """A service's store: processed events, an outbox, and a table the probe writes to."""

    path: Path
    db: Database
    outbox_table: sa.Table
    processed_table: sa.Table
    outbox: Outbox
    commits: int = 0

    async def count(self, table: sa.Table) -> int:
        async with self.db.read() as session:
            return int(
                (await session.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()
            )


@dataclass
class Probe(EffectHandler):
    """An effect handler that checks the write lock is free during its I/O, then asks for one
    outbox event to be recorded with the processed-event row."""

    store: Store
    fail: Callable[[int], Exception | None] = lambda attempt: None
    fail_record: Callable[[int], Exception | None] = lambda attempt: None
    performed: list[str] = field(default_factory=list)
    could_write: list[bool] = field(default_factory=list)
    records: int = 0

    async def perform(self, event: CloudEvent, payload: Message) -> Record | None:
        self.could_write.append(await asyncio.to_thread(can_write, self.store.path))
        self.performed.append(event.id)
        failure = self.fail(len(self.performed))
        if failure is not None:
            raise failure

        async def record(session: AsyncSession) -> None:
            self.records += 1
            failure = self.fail_record(self.records)
            if failure is not None:
                raise failure
            await self.store.outbox.add(
                session, events_pb2.ModelVersionCreated(source_job_id=event.subject), subject="m"
            )

        return record


@pytest_asyncio.fixture(loop_scope="session")
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    path = tmp_path / "service.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    metadata = sa.MetaData()
    outbox_table, processed_table = event_tables(metadata)
    sa.Table("probe", metadata, sa.Column("note", sa.String))
    async with db.engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    store = Store(
        path, db, outbox_table, processed_table, Outbox(outbox_table, source="/plinth/test")
    )

    def counted(_info: Any) -> None:
        store.commits += 1

    db.on_commit(counted)
    yield store
    await db.close()


@pytest_asyncio.fixture(loop_scope="session")
async def bus(own_nats: NatsServer) -> AsyncIterator[EventBus]:
    bus = EventBus(own_nats.url, name="consumer-test")
    await bus.start()
    await bus.connected()
    yield bus
    await bus.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def js(own_nats: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(own_nats.url)
    yield nc.jetstream()
    await nc.close()


@pytest_asyncio.fixture(loop_scope="session")
async def consumers() -> AsyncIterator[list[EventConsumer]]:
    started: list[EventConsumer] = []
    yield started
    for consumer in started:
        await consumer.stop()


async def start(
    consumers: list[EventConsumer],
    bus: EventBus,
    store: Store,
    handler: Handler | EffectHandler,
    *,
    max_deliver: int = 3,
    unavailable_max_age_s: float = 600.0,
) -> EventConsumer:
    consumer = EventConsumer(
        bus,
        store.db,
        store.processed_table,
        ConsumerSettings(
            durable=f"c-{uuid.uuid4().hex[:8]}",
            subjects=[SUBJECT],
            max_deliver=max_deliver,
            backoff_s=(0.05,),
            unavailable_max_age_s=unavailable_max_age_s,
        ),
        handler,
    )
    await consumer.start()
    consumers.append(consumer)
    return consumer


async def publish(
    js: JetStreamContext, job_id: str, *, again: CloudEvent | None = None
) -> CloudEvent:
    """Publishes a job.finished event, or ``again`` under a new Nats-Msg-Id (a redelivery)."""
    event = again or new_event(
        events_pb2.JobFinished(job_id=job_id), source="/plinth/test", subject=job_id
    )
    headers = event.headers()
    if again is not None:
        headers["Nats-Msg-Id"] = f"{event.id}-again-{uuid.uuid4().hex[:6]}"
    await js.publish(SUBJECT, event.data, headers=headers)
    return event


async def reached(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    async def probe() -> bool:
        return predicate()

    await eventually(probe, timeout=timeout, interval=0.02)


async def test_effect_runs_with_the_write_lock_free_and_commits_its_record(
    bus: EventBus, js: JetStreamContext, store: Store, consumers: list[EventConsumer]
) -> None:
    probe = Probe(store)
    consumer = await start(consumers, bus, store, probe)
    await publish(js, "j-1")
    await reached(lambda: consumer.handled == 1)
    assert probe.could_write == [True], "a write transaction was open during the handler's I/O"
    assert await store.count(store.processed_table) == 1
    assert await store.count(store.outbox_table) == 1, "the record commits with the event"


async def test_database_only_handler_runs_inside_the_transaction(
    bus: EventBus, js: JetStreamContext, store: Store, consumers: list[EventConsumer]
) -> None:
    # The probe's control: inside the transaction that recorded the event, the lock is taken.
    could_write: list[bool] = []

    async def handler(session: AsyncSession, event: CloudEvent, payload: Message) -> None:
        could_write.append(await asyncio.to_thread(can_write, store.path))

    consumer = await start(consumers, bus, store, handler)
    await publish(js, "j-1")
    await reached(lambda: consumer.handled == 1)
    assert could_write == [False]


async def test_duplicate_delivery_performs_the_effect_once(
    bus: EventBus, js: JetStreamContext, store: Store, consumers: list[EventConsumer]
) -> None:
    probe = Probe(store)
    consumer = await start(consumers, bus, store, probe)
    event = await publish(js, "j-dup")
    await reached(lambda: consumer.handled == 1)
    await publish(js, "j-dup", again=event)
    await reached(lambda: consumer.duplicates == 1)
    assert probe.performed == [event.id]
    assert await store.count(store.outbox_table) == 1


@pytest.mark.parametrize(
    ("failure", "deliveries"),
    [
        (RuntimeError("the engine refuses"), 3),
        (Unavailable("the engine refuses", dependency="MLflow"), 3),
        (FailedPrecondition("the engine refuses"), 1),
    ],
    ids=["error-retried", "unavailable-retried", "domain-error-dead-at-once"],
)
async def test_failing_effect_is_retried_then_dead_lettered(
    bus: EventBus,
    js: JetStreamContext,
    own_nats: NatsServer,
    store: Store,
    consumers: list[EventConsumer],
    failure: Exception,
    deliveries: int,
) -> None:
    nc = await nats.connect(own_nats.url)
    dead: asyncio.Queue[Msg] = asyncio.Queue()
    await nc.subscribe("dlq." + SUBJECT, cb=dead.put)
    probe = Probe(store, fail=lambda attempt: failure)
    # An outage is ridden out while the event is young; here it is never young enough.
    consumer = await start(consumers, bus, store, probe, max_deliver=3, unavailable_max_age_s=0.0)
    try:
        event = await publish(js, "j-poison")
        letter = await asyncio.wait_for(dead.get(), 15)
    finally:
        await nc.close()
    headers = letter.headers or {}
    assert headers["ce-id"] == event.id and headers["plinth-dlq-deliveries"] == str(deliveries)
    assert "the engine refuses" in headers["plinth-dlq-reason"]
    await reached(lambda: consumer.dead_lettered == 1)  # counted after the dead letter's ack
    assert probe.performed == [event.id] * deliveries and consumer.handled == 0
    assert await store.count(store.processed_table) == 0
    assert await store.count(store.outbox_table) == 0


async def test_an_outage_is_retried_past_max_deliver_while_the_event_is_young(
    bus: EventBus, js: JetStreamContext, store: Store, consumers: list[EventConsumer]
) -> None:
    outage = 6  # deliveries that find the dependency down: twice max_deliver
    probe = Probe(
        store,
        fail=lambda attempt: (
            Unavailable("MLflow is down", dependency="MLflow", retry_after_s=0.05)
            if attempt <= outage
            else None
        ),
    )
    consumer = await start(consumers, bus, store, probe, max_deliver=3)
    event = await publish(js, "j-outage")
    await reached(lambda: consumer.handled == 1)
    assert probe.performed == [event.id] * (outage + 1) and consumer.dead_lettered == 0
    assert await store.count(store.outbox_table) == 1


async def test_a_failed_record_rolls_back_and_the_effect_is_performed_again(
    bus: EventBus, js: JetStreamContext, store: Store, consumers: list[EventConsumer]
) -> None:
    probe = Probe(
        store, fail_record=lambda n: RuntimeError("crash before commit") if n == 1 else None
    )
    consumer = await start(consumers, bus, store, probe)
    event = await publish(js, "j-crash")
    await reached(lambda: consumer.handled == 1)
    assert probe.performed == [event.id, event.id], "redelivered and performed again"
    assert await store.count(store.processed_table) == 1
    assert await store.count(store.outbox_table) == 1


@pytest.mark.parametrize("kind", ["database-only", "effect"])
async def test_a_backlog_commits_in_few_transactions(
    bus: EventBus, js: JetStreamContext, store: Store, consumers: list[EventConsumer], kind: str
) -> None:
    seen: list[str] = []

    async def handler(session: AsyncSession, event: CloudEvent, payload: Message) -> None:
        seen.append(event.id)

    sent = [(await publish(js, f"j-{i}")).id for i in range(30)]
    probe = Probe(store)
    consumer = await start(consumers, bus, store, handler if kind == "database-only" else probe)
    await reached(lambda: consumer.handled == 30)
    assert (seen or probe.performed) == sent, "in order, each once"
    assert store.commits <= 3, f"{store.commits} commits for a backlog of 30"
