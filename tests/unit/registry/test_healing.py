"""How the registry heals around MLflow, with fakes at its seams (no processes): a registration
from ``job.finished`` during an MLflow outage waits or is retried, never dead-lettered, and
happens once MLflow is back, exactly once; the watcher restarts a dead server with backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth_common.db import Database
from plinth_common.errors import Unavailable
from plinth_common.events import (
    CloudEvent,
    ConsumerSettings,
    EventConsumer,
    event_tables,
    new_event,
)
from plinth_common.process import ChildExited
from services.registry.cache import ReadCache
from services.registry.domain import ModelVersion
from services.registry.events import CONSUMER, CONSUMER_OPTIONS, JOB_FINISHED, JobFinishedHandler
from services.registry.healing import Backoff, MlflowGate, MlflowWatcher
from services.registry.service import RegistryService
from tests.unit.registry.fakes import FakeMlflow, MemoryRecords, RecordedEvents

pytestmark = pytest.mark.asyncio(loop_scope="session")

RUN = "a" * 32
KILLED = "was killed by SIGKILL"


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the gate -------------------------------------------------------------------------------


async def test_calls_through_a_closed_gate_name_mlflow_and_why() -> None:
    gate = MlflowGate()
    gate.up()
    gate.check()
    gate.down(f"the MLflow server {KILLED}; the registry is restarting it")
    with pytest.raises(Unavailable) as caught:
        gate.check()
    error = caught.value
    assert error.dependency == "MLflow" and error.reason == "DEPENDENCY_UNAVAILABLE"
    assert KILLED in str(error) and "restarting" in str(error)
    assert error.retry_after_s


async def test_waiters_share_one_budget_per_outage() -> None:
    clock = FakeClock()
    gate = MlflowGate(clock=clock)
    gate.up()
    gate.down("down")
    clock.now += 30.0  # the outage is as old as the budget: nobody waits any more
    assert not await asyncio.wait_for(gate.wait_usable(budget_s=30.0), 1.0)
    gate.up()
    assert await gate.wait_usable(budget_s=30.0)


async def test_a_waiter_proceeds_as_soon_as_mlflow_is_back() -> None:
    gate = MlflowGate()
    waiting = asyncio.create_task(gate.wait_usable(budget_s=30.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.up()
    assert await asyncio.wait_for(waiting, 1.0)


# -- registrations during an outage -----------------------------------------------------------


@dataclass
class OutboxRows:
    """``add_version_created`` as the outbox does it: a row in the consumer's transaction."""

    created: list[tuple[str, str, str]] = field(default_factory=list)

    async def add_version_created(
        self, session: AsyncSession, version: ModelVersion, *, job_id: str
    ) -> None:
        self.created.append((version.name, version.version, job_id))


@dataclass
class FakeMsg:
    """A JetStream message as the consumer sees it, the n-th delivery of one event."""

    event: CloudEvent
    delivery: int
    naks: list[float] = field(default_factory=list)
    acked: bool = False
    stored_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def subject(self) -> str:
        return JOB_FINISHED

    @property
    def headers(self) -> dict[str, str]:
        return self.event.headers()

    @property
    def data(self) -> bytes:
        return self.event.data

    @property
    def reply(self) -> str:
        return f"$JS.ACK.{self.delivery}"

    @property
    def metadata(self) -> Any:
        return SimpleNamespace(num_delivered=self.delivery, timestamp=self.stored_at)

    async def nak(self, delay: float | None = None) -> None:
        self.naks.append(delay or 0.0)

    async def ack(self) -> None:
        self.acked = True


@dataclass
class FakeJetStream:
    dead_letters: list[str] = field(default_factory=list)

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        self.dead_letters.append(subject)


@dataclass
class Registration:
    mlflow: FakeMlflow
    gate: MlflowGate
    clock: FakeClock
    outbox: OutboxRows
    js: FakeJetStream
    consumer: EventConsumer


@pytest_asyncio.fixture(loop_scope="session")
async def registration(tmp_path: Path) -> AsyncIterator[Registration]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    metadata = sa.MetaData()
    _, processed = event_tables(metadata)
    async with db.engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    mlflow = FakeMlflow()
    mlflow.add_run(RUN, {"rmse": 50.0})
    service = RegistryService(
        mlflow=mlflow,
        events=RecordedEvents(),
        cache=ReadCache(ttl_s=60.0),
        facts=ReadCache(ttl_s=60.0),
        records=MemoryRecords(),
    )
    clock = FakeClock()
    gate = MlflowGate(clock=clock)
    gate.up()
    outbox = OutboxRows()
    js = FakeJetStream()
    handler = JobFinishedHandler(service, outbox, gate=gate, wait_budget_s=30.0)
    settings = ConsumerSettings(durable=CONSUMER, subjects=[JOB_FINISHED], **CONSUMER_OPTIONS)
    consumer = EventConsumer(SimpleNamespace(js=js), db, processed, settings, handler)  # type: ignore[arg-type]
    yield Registration(mlflow, gate, clock, outbox, js, consumer)
    await db.close()


def job_finished() -> CloudEvent:
    payload = events_pb2.JobFinished(
        job_id="j-1",
        team="ml",
        status=events_pb2.JOB_OUTCOME_SUCCEEDED,
        mlflow_run_id=RUN,
        outputs={"mlflow_run_id": RUN, "model_uri": f"runs:/{RUN}/model"},
        register_as="diabetes",
    )
    return new_event(payload, source="/plinth/scheduler", subject="j-1", team="ml")


async def deliver(consumer: EventConsumer, msg: FakeMsg) -> None:
    # One fetched batch of one message, as the pull loop hands it over.
    await consumer._process_batch([msg])  # type: ignore[list-item]


async def test_an_mlflow_outage_of_minutes_retries_the_registration_then_registers_once(
    registration: Registration,
) -> None:
    r, event = registration, job_finished()
    r.mlflow.down = True  # what the store would answer too
    r.gate.down(f"the MLflow server {KILLED}; the registry is restarting it")
    r.clock.now += 30.0  # past the handler's wait budget: each delivery fails at once

    outage_s, waited, delivery = 180.0, 0.0, 0
    while waited < outage_s:
        delivery += 1
        msg = FakeMsg(event, delivery)
        await asyncio.wait_for(deliver(r.consumer, msg), 2.0)
        assert msg.naks and not msg.acked, f"delivery {delivery} was not retried"
        waited += msg.naks[0]
    assert r.js.dead_letters == [] and r.consumer.dead_lettered == 0
    assert not r.mlflow.versions, "nothing registered while MLflow is down"

    r.mlflow.down = False
    r.gate.up()
    back = FakeMsg(event, delivery + 1)
    await deliver(r.consumer, back)
    assert back.acked and not back.naks
    again = FakeMsg(event, delivery + 2)  # a redelivery after the ack was lost
    await deliver(r.consumer, again)
    assert again.acked
    assert [v.version for v in r.mlflow.versions.values()] == ["1"]
    assert r.outbox.created == [("diabetes", "1", "j-1")]
    assert r.consumer.handled == 1 and r.consumer.duplicates == 1


async def test_a_short_outage_holds_the_registration_until_mlflow_is_back(
    registration: Registration,
) -> None:
    r = registration
    r.gate.down(f"the MLflow server {KILLED}; the registry is restarting it")
    msg = FakeMsg(job_finished(), 1)
    delivering = asyncio.create_task(deliver(r.consumer, msg))
    await asyncio.sleep(0.05)
    assert not delivering.done() and not r.mlflow.versions
    r.gate.up()
    await asyncio.wait_for(delivering, 2.0)
    assert msg.acked and not msg.naks
    assert r.outbox.created == [("diabetes", "1", "j-1")]


async def test_jobs_that_register_nothing_do_not_wait_for_mlflow(
    registration: Registration,
) -> None:
    r = registration
    r.gate.down("starting")
    payload = events_pb2.JobFinished(job_id="j-2", team="ml", status=events_pb2.JOB_OUTCOME_FAILED)
    event = new_event(payload, source="/plinth/scheduler", subject="j-2", team="ml")
    msg = FakeMsg(event, 1)
    await asyncio.wait_for(deliver(r.consumer, msg), 2.0)
    assert msg.acked


# -- the restart watcher ----------------------------------------------------------------------


class FakeServer:
    """An MLflow server whose exits and failed starts the test scripts."""

    def __init__(self) -> None:
        self.exits: asyncio.Queue[str] = asyncio.Queue()
        self.failures: list[Exception] = []  # raised by the next wait_ready calls, in order
        self.restarted = 0
        self.ready_calls = 0

    async def wait_exited(self) -> str:
        return await self.exits.get()

    async def restart(self) -> None:
        self.restarted += 1

    async def wait_ready(self, timeout: float | None = None) -> None:
        self.ready_calls += 1
        if self.failures:
            raise self.failures.pop(0)


class FakeSleep:
    """``asyncio.sleep`` that records the delay and moves the fake clock instead of waiting."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.clock.now += delay
        await asyncio.sleep(0)


@dataclass
class Watched:
    server: FakeServer
    gate: MlflowGate
    clock: FakeClock
    sleep: FakeSleep
    watcher: MlflowWatcher


@pytest_asyncio.fixture(loop_scope="session")
async def watched() -> AsyncIterator[Watched]:
    clock = FakeClock()
    server, gate, sleep = FakeServer(), MlflowGate(clock=clock), FakeSleep(clock)
    watcher = MlflowWatcher(
        server,
        gate,
        backoff=Backoff(initial_s=0.5, max_s=4.0, stable_s=60.0),
        sleep=sleep,
        clock=clock,
    )
    task = asyncio.create_task(watcher.run())
    yield Watched(server, gate, clock, sleep, watcher)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def exited(code: int) -> ChildExited:
    return ChildExited("mlflow server", code, "Traceback ...", context=" before it was ready")


async def test_a_dead_server_is_restarted_with_growing_delays_until_it_answers(
    watched: Watched,
) -> None:
    w = watched
    await settle()
    assert w.gate.usable and w.server.restarted == 0

    w.server.failures = [exited(1), TimeoutError("not answering after 90.0s")]
    await w.server.exits.put(KILLED)
    await settle()
    assert w.gate.usable
    assert w.sleep.delays == [0.5, 1.0, 2.0]
    assert w.server.restarted == 3 and w.watcher.restarts == 3
    assert w.watcher.last_exit == KILLED


async def test_the_gate_is_closed_with_the_cause_while_restarts_fail(watched: Watched) -> None:
    w = watched
    await settle()
    never = asyncio.Event()

    async def stuck(timeout: float | None = None) -> None:
        await never.wait()

    w.server.failures = [exited(1)]
    original = w.server.wait_ready
    calls = 0

    async def fail_then_hang(timeout: float | None = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await original(timeout)
        else:
            await stuck(timeout)

    w.server.wait_ready = fail_then_hang  # type: ignore[method-assign]
    await w.server.exits.put(KILLED)
    await settle()
    assert not w.gate.usable
    assert "did not come up (mlflow server exited with code 1 before it was ready)" in (
        w.gate.reason
    )
    never.set()
    await settle()
    assert w.gate.usable


async def test_a_server_that_keeps_dying_is_restarted_at_the_capped_pace(
    watched: Watched,
) -> None:
    w = watched
    await settle()
    for _ in range(6):  # it answers, then dies again at once
        await w.server.exits.put(KILLED)
        await settle()
    assert w.sleep.delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


async def test_a_crash_after_a_stable_run_starts_the_backoff_over(watched: Watched) -> None:
    w = watched
    await settle()
    for _ in range(3):
        await w.server.exits.put(KILLED)
        await settle()
    w.clock.now += 61.0  # up for longer than stable_s
    await w.server.exits.put(KILLED)
    await settle()
    assert w.sleep.delays == [0.5, 1.0, 2.0, 0.5]
