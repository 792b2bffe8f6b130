"""Metrics of the shared plumbing against real processes: the outbox relay and a durable consumer
on a nats-server of the test's own (published counts, the backlog while NATS is down, the
publish-to-handle lag with the producer's trace id, redeliveries, dead letters), and a real
scheduler process started as ``make run`` starts it, scraped over HTTP on the port the launcher
gave it."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf.message import Message
from opentelemetry import trace
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession

from plinth.events.v1 import events_pb2
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.db import Database
from plinth_common.devstack import LocalPlatform, PlatformConfig
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
from plinth_common.metrics import Metrics
from plinth_common.nats_server import NatsServer
from tests.helpers import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")

SUBJECT = "plinth.job.finished"


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    async def probe() -> bool:
        return predicate()

    await eventually(probe, timeout=timeout)


def _value(text: str, name: str, **labels: str) -> float:
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(found)


@dataclass
class Plumbing:
    metrics: Metrics
    db: Database
    bus: EventBus
    outbox: Outbox
    relay: OutboxRelay
    processed: sa.Table

    def scrape(self) -> str:
        return self.metrics.exposition().decode()

    async def emit(self, n: int) -> None:
        async with self.db.transaction() as session:
            for i in range(n):
                await self.outbox.add(
                    session,
                    events_pb2.JobFinished(job_id=f"j{i}", team="ml"),
                    subject=f"j{i}",
                    team="ml",
                )

    async def consume(self, fail: Exception | None = None) -> EventConsumer:
        async def handler(session: AsyncSession, event: CloudEvent, payload: Message) -> None:
            if fail is not None:
                raise fail

        consumer = EventConsumer(
            self.bus,
            self.db,
            self.processed,
            ConsumerSettings(
                durable=f"c{uuid.uuid4().hex[:8]}",
                subjects=[SUBJECT],
                max_deliver=3,
                backoff_s=(0.05,),
            ),
            handler,
            metrics=self.metrics,
        )
        await consumer.start()
        return consumer


@pytest_asyncio.fixture(loop_scope="session")
async def plumbing(tmp_path: Path, own_nats: NatsServer) -> AsyncIterator[Plumbing]:
    metrics = Metrics("test")
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    metadata = sa.MetaData()
    outbox_table, processed = event_tables(metadata)
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    bus = EventBus(own_nats.url, name="test")
    await bus.start()
    relay = OutboxRelay(db, outbox_table, bus, poll_interval_s=0.2, metrics=metrics)
    await relay.start()
    yield Plumbing(metrics, db, bus, Outbox(outbox_table, source="/plinth/test"), relay, processed)
    await relay.stop()
    await bus.stop()
    await db.close()


async def test_publications_backlog_and_lag_are_exact_across_a_nats_outage(
    plumbing: Plumbing, own_nats: NatsServer
) -> None:
    consumer = await plumbing.consume()
    try:
        with trace.get_tracer("test").start_as_current_span("request") as span:
            await plumbing.emit(5)
            trace_id = format(span.get_span_context().trace_id, "032x")
        await until(lambda: consumer.handled == 5)
        text = plumbing.scrape()
        assert _value(text, "plinth_events_published_total", subject=SUBJECT) == 5
        assert _value(text, "plinth_events_outbox_backlog") == 0
        assert _value(text, "plinth_events_handle_lag_seconds_count", subject=SUBJECT) == 5
        exemplars = {
            sample.exemplar.labels["trace_id"]
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "plinth_events_handle_lag_seconds_bucket" and sample.exemplar
        }
        assert exemplars == {trace_id}  # the lag links to the request that caused the event

        await own_nats.stop(kill=True)
        await plumbing.emit(3)
        # The relay cannot publish; the backlog shows the 3 waiting events.
        await until(lambda: _value(plumbing.scrape(), "plinth_events_outbox_backlog") == 3)
        await own_nats.start()
        await until(lambda: consumer.handled == 8, timeout=30)
        await until(lambda: _value(plumbing.scrape(), "plinth_events_outbox_backlog") == 0)
        text = plumbing.scrape()
        assert _value(text, "plinth_events_published_total", subject=SUBJECT) == 8
        assert _value(text, "plinth_events_handle_lag_seconds_count", subject=SUBJECT) == 8
        assert _value(text, "plinth_events_dead_letters_total") == 0
    finally:
        await consumer.stop()


async def test_redeliveries_and_dead_letters_are_counted_per_consumer(
    plumbing: Plumbing,
) -> None:
    flaky = await plumbing.consume(fail=RuntimeError("a dependency hiccup"))
    refusing = await plumbing.consume(fail=FailedPrecondition("not in this state"))
    try:
        await plumbing.emit(1)
        await until(lambda: flaky.dead_lettered == 1 and refusing.dead_lettered == 1)
        text = plumbing.scrape()
        flaky_name, refusing_name = flaky.settings.durable, refusing.settings.durable
        # Retried: deliveries 2 and 3 are redeliveries, then the third failure dead-letters.
        assert _value(text, "plinth_events_redeliveries_total", consumer=flaky_name) == 2
        assert _value(text, "plinth_events_dead_letters_total", consumer=flaky_name) == 1
        # A domain refusal goes to the dead letters at once: no redelivery.
        assert _value(text, "plinth_events_redeliveries_total", consumer=refusing_name) == 0
        assert _value(text, "plinth_events_dead_letters_total", consumer=refusing_name) == 1
        assert _value(text, "plinth_events_handle_lag_seconds_count") == 0  # none was handled
    finally:
        await flaky.stop()
        await refusing.stop()


def _get(url: str) -> str:
    request = urllib.request.Request(
        url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())


async def test_a_service_process_serves_its_metrics_on_the_port_make_run_gave_it(
    tmp_path: Path,
) -> None:
    platform = LocalPlatform(PlatformConfig.ephemeral(tmp_path, services=("scheduler",)))
    url = platform.metrics_url("scheduler")
    assert ("metrics", f"{'scheduler':<10} {url}") in platform.endpoints()
    await platform.start(timeout=90)
    try:
        async with platform.service_channel("scheduler") as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetJob(pb.GetJobRequest(job_id="no-such-job"), timeout=10)
                assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        text = await asyncio.to_thread(_get, url)
        service = "plinth.scheduler.v1.SchedulerService"
        labels = {"service": service, "method": "GetJob"}
        assert _value(text, "plinth_grpc_server_requests_total", **labels, code="NOT_FOUND") == 2
        assert _value(text, "plinth_grpc_server_requests_total", **labels, code="OK") == 0
        assert _value(text, "plinth_grpc_server_request_duration_seconds_count", **labels) == 2
        # The launcher's readiness probes are counted too, under the health service.
        assert _value(text, "plinth_grpc_server_requests_total", service="grpc.health.v1.Health")
    finally:
        await platform.stop()
    with pytest.raises(OSError):
        await asyncio.to_thread(_get, url)
