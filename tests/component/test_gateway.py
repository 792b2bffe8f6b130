"""The gateway in front of a real scheduler: forwarding, errors, deadlines, the event stream."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from plinth.events.v1 import events_pb2
from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.nats_server import NatsServer
from plinth_common.net import free_tcp_port
from services.gateway.app import GatewayApp, GatewaySettings
from services.scheduler.app import SchedulerApp, SchedulerSettings
from tests.helpers import eventually, service_env

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Platform:
    scheduler: SchedulerApp
    gateway: GatewayApp
    channel: grpc.aio.Channel

    @property
    def jobs(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    @property
    def events(self) -> gateway_pb2_grpc.EventServiceStub:
        return gateway_pb2_grpc.EventServiceStub(self.channel)


@pytest_asyncio.fixture(loop_scope="session")
async def platform(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Platform]:
    scheduler = SchedulerApp(SchedulerSettings.from_env(service_env(tmp_path, nats_server.url)))
    await scheduler.start()
    unused = free_tcp_port()  # nothing listens here: the registry is "down"
    gateway = GatewayApp(
        GatewaySettings.from_env(
            service_env(
                tmp_path,
                nats_server.url,
                PLINTH_SCHEDULER_ADDR=f"127.0.0.1:{scheduler.port}",
                PLINTH_REGISTRY_ADDR=f"127.0.0.1:{unused}",
            )
        )
    )
    await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    yield Platform(scheduler, gateway, channel)
    await channel.close()
    await gateway.stop()
    await scheduler.stop()


async def test_jobs_api_is_forwarded_with_status_codes(platform: Platform) -> None:
    submitted = await platform.jobs.SubmitJob(
        pb.SubmitJobRequest(spec=pb.JobSpec(name="via-gw", team="ml", entrypoint=["true"]))
    )
    got = await platform.jobs.GetJob(pb.GetJobRequest(job_id=submitted.job.id))
    assert got.spec.name == "via-gw"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await platform.jobs.GetJob(pb.GetJobRequest(job_id="j-missing"))
    assert (
        caught.value.code() == grpc.StatusCode.NOT_FOUND and "j-missing" in caught.value.details()
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await platform.jobs.SubmitJob(pb.SubmitJobRequest(spec=pb.JobSpec(name="x", team="ml")))
    assert (
        caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and caught.value.details().startswith("spec.entrypoint")
    )


async def test_unreachable_upstream_is_unavailable_with_its_name(platform: Platform) -> None:
    registry = registry_pb2_grpc.RegistryServiceStub(platform.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.GetRun(registry_pb2.GetRunRequest(run_id="r"), timeout=5)
    assert (
        caught.value.code() == grpc.StatusCode.UNAVAILABLE and "registry" in caught.value.details()
    )


async def test_client_deadline_is_forwarded(platform: Platform) -> None:
    job = (
        await platform.jobs.SubmitJob(
            pb.SubmitJobRequest(
                spec=pb.JobSpec(
                    name="slow",
                    team="ml",
                    entrypoint=[sys.executable, "-c", "import time; time.sleep(3)"],
                )
            )
        )
    ).job
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in platform.jobs.StreamJobLogs(
            pb.StreamJobLogsRequest(job_id=job.id, follow=True), timeout=0.5
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await platform.jobs.CancelJob(pb.CancelJobRequest(job_id=job.id))


async def test_watch_events_filters_by_type_and_team(platform: Platform) -> None:
    stream = platform.events.WatchEvents(
        gateway_pb2.WatchEventsRequest(types=["job.finished"], team="vision")
    )
    received: list[gateway_pb2.Event] = []

    async def collect() -> None:
        async for event in stream:
            received.append(event)

    collector = asyncio.create_task(collect())
    await asyncio.sleep(0.3)  # the subscription is in place
    other = await platform.jobs.SubmitJob(
        pb.SubmitJobRequest(spec=pb.JobSpec(name="other", team="nlp", entrypoint=["true"]))
    )
    mine = await platform.jobs.SubmitJob(
        pb.SubmitJobRequest(spec=pb.JobSpec(name="mine", team="vision", entrypoint=["true"]))
    )

    async def got_mine() -> bool:
        return any(e.subject == mine.job.id for e in received)

    await eventually(got_mine)
    await asyncio.sleep(0.3)
    collector.cancel()
    assert all(e.type == "plinth.job.finished" and e.team == "vision" for e in received)
    assert other.job.id not in {e.subject for e in received}
    event = next(e for e in received if e.subject == mine.job.id)
    payload = events_pb2.JobFinished.FromString(event.data)
    assert payload.status == events_pb2.JOB_OUTCOME_SUCCEEDED and '"job_id"' in event.data_json
    assert event.data_schema == "plinth.events.v1.JobFinished" and event.traceparent.startswith(
        "00-"
    )


async def test_watch_events_refuses_unknown_types(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in platform.events.WatchEvents(
            gateway_pb2.WatchEventsRequest(types=["job.exploded"])
        ):
            pass
    assert (
        caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "job.exploded" in caught.value.details()
    )


async def test_gateway_call_and_scheduler_work_share_one_trace(
    platform: Platform, spans: InMemorySpanExporter
) -> None:
    job = (
        await platform.jobs.SubmitJob(
            pb.SubmitJobRequest(spec=pb.JobSpec(name="traced", team="ml", entrypoint=["true"]))
        )
    ).job

    async def finished_published() -> bool:
        return any(
            s.name == "plinth.job.finished publish" and s.attributes.get("messaging.message.id")
            for s in spans.get_finished_spans()
        ) and any(s.name == "job traced" for s in spans.get_finished_spans())

    await eventually(finished_published)
    recorded = spans.get_finished_spans()
    client = next(
        s
        for s in recorded
        if s.kind == SpanKind.CLIENT and s.name.endswith("SubmitJob") and s.parent is None
    )
    trace_id = client.context.trace_id
    names = {s.name for s in recorded if s.context.trace_id == trace_id}
    assert "job traced" in names
    assert {"plinth.job.submitted publish", "plinth.job.finished publish"} <= names
    servers = [
        s
        for s in recorded
        if s.context.trace_id == trace_id
        and s.kind == SpanKind.SERVER
        and s.name.endswith("SubmitJob")
    ]
    assert len(servers) == 2, "gateway and scheduler each serve the call within the trace"
    assert job.id
