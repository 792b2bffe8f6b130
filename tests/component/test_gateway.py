"""The gateway in front of a real scheduler (and a stand-in for serving): forwarding, rich
errors over gRPC and HTTP, a down upstream named, deadlines, the event stream, fuzzed bytes.

Authentication is on: the tests call as the gateway's bootstrap admin key (what `make run`
writes); access rules themselves are tested in test_gateway_auth.py."""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats.errors
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncSession
from tritonclient.grpc import service_pb2 as inference_pb2
from tritonclient.grpc import service_pb2_grpc as inference_grpc

from plinth.events.v1 import events_pb2
from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.auth import bearer_interceptors
from plinth_common.db import Database
from plinth_common.errors import NotFound, Unavailable
from plinth_common.events import CloudEvent, ConsumerSettings, EventBus, EventConsumer, event_tables
from plinth_common.events.envelope import new_event
from plinth_common.grpc_server import GrpcServer
from plinth_common.nats_server import NatsServer
from plinth_common.net import free_tcp_port
from plinth_common.rich_status import details_of
from plinth_sdk import Plinth
from plinth_sdk.errors import InvalidArgument as PlinthInvalidArgument
from plinth_sdk.errors import NotFound as PlinthNotFound
from plinth_sdk.events import DeadLetter
from services.gateway.app import GatewayApp, GatewaySettings
from services.gateway.events import NatsDeadLetterStore, NatsEventSource
from services.gateway.http import GatewayHttp, start_http
from services.gateway.service import DeadLetters, EventStreams, StartPoint
from services.gateway.servicer import WATCH_AFTER, WATCH_LIVE, EventServicer
from services.scheduler.app import SchedulerApp, SchedulerSettings
from tests.helpers import eventually, service_env

pytestmark = pytest.mark.asyncio(loop_scope="session")

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class ServingStandIn(inference_grpc.GRPCInferenceServiceServicer):
    """Answers inference as the serving service does when a deployment is missing or its
    engine is down: with Plinth's rich status."""

    async def ModelInfer(
        self, request: inference_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelInferResponse:
        if request.model_name == "engine-down":
            raise Unavailable(
                "the serving engine cannot be reached", dependency="serving engine", retry_after_s=2
            )
        raise NotFound("deployment", request.model_name, hint="deployments: fraud")


def bearer_channel(target: str, key: str) -> grpc.aio.Channel:
    """A channel whose every call carries ``key`` as its credential."""
    return grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(key))


@dataclass
class Platform:
    scheduler: SchedulerApp
    gateway: GatewayApp
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession

    @property
    def jobs(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    @property
    def events(self) -> gateway_pb2_grpc.EventServiceStub:
        return gateway_pb2_grpc.EventServiceStub(self.channel)

    async def watch(
        self, types: list[str], team: str, **start: Any
    ) -> tuple[list[gateway_pb2.Event], asyncio.Task[None]]:
        """A watch (``since=`` / ``after_sequence=``: from there on): returns once the gateway
        says its subscription is in place. A watch of every type leaves out the audit events
        (these tests submit as an admin, and each submission is audited for its team)."""
        stream = self.events.WatchEvents(
            gateway_pb2.WatchEventsRequest(types=types, team=team, **start)
        )
        assert WATCH_LIVE in tuple(await stream.initial_metadata())
        received: list[gateway_pb2.Event] = []

        async def collect() -> None:
            async for event in stream:
                if types or event.type != "plinth.audit.recorded":
                    received.append(event)

        return received, asyncio.create_task(collect())


@pytest_asyncio.fixture(loop_scope="session")
async def platform(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Platform]:
    # No registry here: jobs get no team MLflow credentials (they would wait for the registry).
    scheduler = SchedulerApp(
        SchedulerSettings.from_env(
            service_env(tmp_path, nats_server.url, PLINTH_SCHEDULER_MLFLOW_AUTH="none")
        )
    )
    await scheduler.start()
    serving = GrpcServer(host="127.0.0.1", port=0)
    serving.add(
        inference_grpc.add_GRPCInferenceServiceServicer_to_server, ServingStandIn(), INFERENCE
    )
    await serving.start()
    unused = free_tcp_port()  # nothing listens here: the registry and features are "down"
    gateway = GatewayApp(
        GatewaySettings.from_env(
            service_env(
                tmp_path,
                nats_server.url,
                PLINTH_SCHEDULER_ADDR=f"127.0.0.1:{scheduler.port}",
                PLINTH_REGISTRY_ADDR=f"127.0.0.1:{unused}",
                PLINTH_FEATURES_ADDR=f"127.0.0.1:{unused}",
                PLINTH_SERVING_ADDR=f"127.0.0.1:{serving.port}",
                PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE=str(tmp_path / "admin.key"),
            )
        )
    )
    await gateway.start()
    channel = bearer_channel(f"127.0.0.1:{gateway.port}", gateway.admin_key)
    http = aiohttp.ClientSession(
        f"http://127.0.0.1:{gateway.http_port}",
        headers={"Authorization": f"Bearer {gateway.admin_key}"},
    )
    yield Platform(scheduler, gateway, channel, http)
    await http.close()
    await channel.close()
    await gateway.stop()
    await serving.stop(0)
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


async def test_upstream_not_found_reaches_the_client_with_its_rich_status(
    platform: Platform,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await platform.jobs.GetJob(pb.GetJobRequest(job_id="j-missing"))
    details = details_of(caught.value.trailing_metadata())
    # The scheduler's own ErrorInfo, not one the gateway made up: the client learns who refused.
    assert (details.reason, details.domain) == ("NOT_FOUND", "scheduler.plinth")
    assert details.resource == ("job", "j-missing")


async def test_upstream_invalid_argument_names_the_field(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await platform.jobs.SubmitJob(pb.SubmitJobRequest(spec=pb.JobSpec(name="x", team="ml")))
    details = details_of(caught.value.trailing_metadata())
    assert (details.reason, details.domain) == ("INVALID_FIELD", "scheduler.plinth")
    assert [field for field, _ in details.field_violations] == ["spec.entrypoint"]


async def test_down_upstream_is_unavailable_naming_it_while_the_gateway_serves(
    platform: Platform,
) -> None:
    registry = registry_pb2_grpc.RegistryServiceStub(platform.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.GetRun(registry_pb2.GetRunRequest(run_id="r"), timeout=5)
    details = details_of(caught.value.trailing_metadata())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "registry service" in caught.value.details()
    assert details.reason == "DEPENDENCY_UNAVAILABLE"
    assert details.metadata["dependency"] == "registry service"
    assert details.domain == "gateway.plinth"  # the gateway says so, not the registry
    assert details.retry_after_s is not None and details.retry_after_s > 0

    health = health_pb2_grpc.HealthStub(platform.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with platform.http.get("/healthz") as page:
        body = await page.json()
    assert page.status == 503 and body["status"] == "DEGRADED"
    assert body["services"]["scheduler"] == "SERVING"
    assert body["services"]["registry"].startswith("UNREACHABLE")


async def _infer(platform: Platform, model: str, body: bytes) -> tuple[int, Any, str | None]:
    async with platform.http.post(
        f"/v2/models/{model}/infer", data=body, headers={"Content-Type": "application/json"}
    ) as reply:
        return reply.status, await reply.json(), reply.headers.get("Retry-After")


_TENSOR = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}'


async def test_http_error_bodies_carry_the_reason_and_details(platform: Platform) -> None:
    assert await _infer(platform, "fraud", b"{not json") == (
        400,
        {"error": "body: not valid JSON", "reason": "INVALID_FIELD", "details": {"field": "body"}},
        None,
    )
    status, body, retry_after = await _infer(platform, "nope", _TENSOR)
    assert (status, retry_after) == (404, None)
    assert body == {
        "error": "deployment 'nope' not found; deployments: fraud",
        "reason": "NOT_FOUND",
        "details": {"kind": "deployment", "name": "nope"},
    }
    status, body, retry_after = await _infer(platform, "engine-down", _TENSOR)
    assert (status, retry_after, body["reason"]) == (503, "2", "DEPENDENCY_UNAVAILABLE")
    assert body["details"] == {"dependency": "serving engine"}


async def test_http_with_serving_down_names_the_serving_service() -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_tcp_port()}") as down:
        runner, port = await start_http(GatewayHttp(down, {"serving": down}).app, "127.0.0.1", 0)
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://127.0.0.1:{port}/v2/models/fraud/infer", data=_TENSOR
                ) as reply,
            ):
                body = await reply.json()
        finally:
            await runner.cleanup()
    assert (reply.status, reply.headers.get("Retry-After")) == (503, "1")
    assert body["reason"] == "DEPENDENCY_UNAVAILABLE"
    assert body["details"] == {"dependency": "serving service"}
    assert "serving service" in body["error"]


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


def _of(events: list[gateway_pb2.Event], job_id: str) -> list[str]:
    return [e.type for e in events if e.subject == job_id]


async def test_watch_events_filters_by_type_and_team(platform: Platform) -> None:
    vision, vision_task = await platform.watch(["job.finished"], "vision")
    nlp, nlp_task = await platform.watch([], "nlp")
    try:
        other = (
            await platform.jobs.SubmitJob(
                pb.SubmitJobRequest(spec=pb.JobSpec(name="other", team="nlp", entrypoint=["true"]))
            )
        ).job

        async def other_finished() -> bool:
            return "plinth.job.finished" in _of(nlp, other.id)

        # Every event of the nlp job is published before the vision job exists, so a filter
        # that let any through would have delivered it to the vision watcher first.
        await eventually(other_finished)
        mine = (
            await platform.jobs.SubmitJob(
                pb.SubmitJobRequest(
                    spec=pb.JobSpec(name="mine", team="vision", entrypoint=["true"])
                )
            )
        ).job

        async def got_mine() -> bool:
            return bool(_of(vision, mine.id))

        await eventually(got_mine)
    finally:
        vision_task.cancel()
        nlp_task.cancel()
    assert [(e.subject, e.type) for e in vision] == [(mine.id, "plinth.job.finished")]
    other_types = _of(nlp, other.id)  # every type, in order; the scheduler may add more
    assert other_types[0] == "plinth.job.submitted" and other_types[-1] == "plinth.job.finished"
    assert "plinth.job.started" in other_types and {e.team for e in nlp} == {"nlp"}
    event = vision[0]
    payload = events_pb2.JobFinished.FromString(event.data)
    assert payload.status == events_pb2.JOB_OUTCOME_SUCCEEDED and '"job_id"' in event.data_json
    assert event.team == "vision" and event.data_schema == "plinth.events.v1.JobFinished"
    assert event.traceparent.startswith("00-")


async def _run_job(platform: Platform, name: str, team: str) -> list[gateway_pb2.Event]:
    """Runs a job to its end; returns its events as a live watcher saw them (all published)."""
    seen, task = await platform.watch([], team)
    try:
        job = (
            await platform.jobs.SubmitJob(
                pb.SubmitJobRequest(spec=pb.JobSpec(name=name, team=team, entrypoint=["true"]))
            )
        ).job

        async def finished() -> bool:
            return "plinth.job.finished" in _of(seen, job.id)

        await eventually(finished)
    finally:
        task.cancel()
    return [e for e in seen if e.subject == job.id]


def _ids(events: list[gateway_pb2.Event]) -> list[tuple[int, str, str]]:
    return [(e.sequence, e.type, e.id) for e in events]


async def _until(events: list[gateway_pb2.Event], count: int) -> list[gateway_pb2.Event]:
    async def enough() -> bool:
        return len(events) >= count

    await eventually(enough)
    return events[:count]


async def test_watch_events_replays_since_a_time_for_the_team_only(platform: Platform) -> None:
    before = Timestamp()
    before.GetCurrentTime()
    others = await _run_job(platform, "replay-other", "replay-nlp")
    mine = await _run_job(platform, "replay-mine", "replay-vision")
    sequences = [e.sequence for e in others + mine]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences) > 0

    replayed, task = await platform.watch([], "replay-vision", since=before)
    try:
        # Every event of the other team's job is older than mine: a leak would come first.
        got = await _until(replayed, len(mine))
    finally:
        task.cancel()
    assert _ids(got) == _ids(mine)
    assert got[0].type == "plinth.job.submitted" and got[-1].type == "plinth.job.finished"

    finished, task = await platform.watch(["job.finished"], "", since=before)
    teams = {"replay-nlp", "replay-vision"}

    async def both_finished() -> list[gateway_pb2.Event]:
        ours = [e for e in finished if e.team in teams]  # other tests' jobs may end meanwhile
        return ours if len(ours) >= 2 else []

    try:
        got = await eventually(both_finished)
    finally:
        task.cancel()
    assert {e.type for e in finished} == {"plinth.job.finished"}
    assert [(e.subject, e.team) for e in got] == [
        (others[-1].subject, "replay-nlp"),
        (mine[-1].subject, "replay-vision"),
    ]


async def test_watch_events_resumes_exactly_after_a_sequence(platform: Platform) -> None:
    mine = await _run_job(platform, "resume", "resume-ml")
    assert len(mine) >= 3
    resumed, task = await platform.watch([], "resume-ml", after_sequence=mine[0].sequence)
    try:
        got = await _until(resumed, len(mine) - 1)
        # The newest one as the resume point: nothing old, then what follows.
        caught_up, follow = await platform.watch([], "resume-ml", after_sequence=mine[-1].sequence)
        later = await _run_job(platform, "resume-later", "resume-ml")
        followed = await _until(caught_up, len(later))
        follow.cancel()
    finally:
        task.cancel()
    assert _ids(got) == _ids(mine[1:])
    assert _ids(followed) == _ids(later)


async def test_a_watch_names_its_resume_point_before_its_first_event(platform: Platform) -> None:
    # A live watch is pinned after the newest event: a client whose stream breaks before any
    # event arrives resumes from there and misses nothing.
    js = await platform.gateway.runtime.bus.connected()
    event = new_event(events_pb2.JobSubmitted(job_id="j-pin"), source="test", subject="j-pin")
    newest = (await js.publish(event.type, event.data, headers=event.headers())).seq
    live = platform.events.WatchEvents(gateway_pb2.WatchEventsRequest(team="pin"))
    resumed = platform.events.WatchEvents(
        gateway_pb2.WatchEventsRequest(team="pin", after_sequence=1)
    )
    since = platform.events.WatchEvents(
        gateway_pb2.WatchEventsRequest(team="pin", since=Timestamp(seconds=1))
    )
    try:
        metadata = [dict(await call.initial_metadata()) for call in (live, resumed, since)]
    finally:
        for call in (live, resumed, since):
            call.cancel()
    assert all(m[WATCH_LIVE[0]] == WATCH_LIVE[1] for m in metadata)
    assert int(metadata[0][WATCH_AFTER]) >= newest
    assert metadata[1][WATCH_AFTER] == "1"
    assert WATCH_AFTER not in metadata[2]


async def test_a_live_watch_survives_a_nats_restart_without_replaying_the_past(
    own_nats: NatsServer,
) -> None:
    bus = EventBus(own_nats.url, name="gateway-restart-test")
    await bus.start()
    js = await bus.connected()

    async def publish(job_id: str) -> int:
        event = new_event(events_pb2.JobSubmitted(job_id=job_id), source="test", subject=job_id)
        return (await js.publish(event.type, event.data, headers=event.headers())).seq

    try:
        for old in ("old-1", "old-2", "old-3"):
            await publish(old)
        source = NatsEventSource(bus, idle_heartbeat_s=0.5)
        async with source.subscribe(types=frozenset(), start=StartPoint()) as events:
            # The ordered consumer lives in the server's memory: the restart loses it, and the
            # client re-creates it from the last sequence it knows (none delivered yet).
            await own_nats.restart()

            async def republished() -> int | None:
                try:
                    return await publish("new")
                except (nats.errors.Error, TimeoutError):
                    return None  # still reconnecting

            sequence = await eventually(republished)
            first = await asyncio.wait_for(anext(events), timeout=20)
    finally:
        await bus.stop()
    assert (first.event.subject, first.sequence) == ("new", sequence)


async def _refused(platform: Platform, request: gateway_pb2.WatchEventsRequest) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in platform.events.WatchEvents(request):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert WATCH_LIVE not in tuple(caught.value.initial_metadata() or ())
    return caught.value


async def test_watch_events_refuses_two_start_points_and_an_unknown_resume_point(
    platform: Platform,
) -> None:
    later = Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    _, waiting = await platform.watch([], "", since=later)  # a future time: nothing until then
    waiting.cancel()

    since = Timestamp()
    since.GetCurrentTime()
    both = await _refused(platform, gateway_pb2.WatchEventsRequest(since=since, after_sequence=1))
    assert both.details().startswith("after_sequence: cannot be combined with since")
    assert [f for f, _ in details_of(both.trailing_metadata()).field_violations] == [
        "after_sequence"
    ]
    future = await _refused(platform, gateway_pb2.WatchEventsRequest(after_sequence=10**15))
    assert "is past the newest event" in future.details()


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
    assert WATCH_LIVE not in tuple(caught.value.initial_metadata() or ())


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
            s.name == "plinth.job.finished publish"
            and (s.attributes or {}).get("messaging.message.id")
            for s in spans.get_finished_spans()
        ) and any(s.name == "job traced" for s in spans.get_finished_spans())

    await eventually(finished_published)
    recorded = spans.get_finished_spans()
    client = next(
        s
        for s in recorded
        if s.kind == SpanKind.CLIENT and s.name.endswith("SubmitJob") and s.parent is None
    )
    assert client.context is not None
    trace_id = client.context.trace_id
    in_trace = [s for s in recorded if s.context is not None and s.context.trace_id == trace_id]
    names = {s.name for s in in_trace}
    assert "job traced" in names
    assert {"plinth.job.submitted publish", "plinth.job.finished publish"} <= names
    servers = [s for s in in_trace if s.kind == SpanKind.SERVER and s.name.endswith("SubmitJob")]
    assert len(servers) == 2, "gateway and scheduler each serve the call within the trace"
    assert job.id


# Fuzzing: bytes that do not decode as the method's request must be INVALID_ARGUMENT
# (MALFORMED_REQUEST) from the service behind the gateway; bytes that happen to decode must
# still never be UNKNOWN or INTERNAL. Seeded, so a failure replays.
_FUZZ_SEED = 6
_FUZZ_PER_METHOD = 40
_SCHEDULER = "/plinth.scheduler.v1.SchedulerService"
_FUZZED: dict[str, tuple[type[Message], Message | None, bool]] = {
    # path: (request type, a valid request to mutate (None: random bytes only), streaming)
    f"{_SCHEDULER}/GetJob": (pb.GetJobRequest, pb.GetJobRequest(job_id="j-0123456789"), False),
    f"{_SCHEDULER}/ListJobs": (
        pb.ListJobsRequest,
        pb.ListJobsRequest(team="ml", page_size=10, page_token="abc"),
        False,
    ),
    f"{_SCHEDULER}/CancelJob": (
        pb.CancelJobRequest,
        pb.CancelJobRequest(job_id="j-0123456789"),
        False,
    ),
    f"{_SCHEDULER}/StreamJobLogs": (
        pb.StreamJobLogsRequest,
        pb.StreamJobLogsRequest(job_id="j-0123456789"),
        True,
    ),
    # Random bytes only: a mutated valid spec could start a process.
    f"{_SCHEDULER}/SubmitJob": (pb.SubmitJobRequest, None, False),
}


def _mutated(valid: bytes, rng: random.Random) -> bytes:
    data = bytearray(valid)
    mutation: Callable[[], None] = rng.choice(
        [
            lambda: data.__setitem__(rng.randrange(len(data)), rng.randrange(256)),
            lambda: data.insert(rng.randrange(len(data) + 1), rng.randrange(256)),
            lambda: data.__delitem__(slice(rng.randrange(1, len(data)), None)),
            lambda: data.__setitem__(1, rng.choice([0x7F, 0xFF, len(data) + 5])),
        ]
    )
    mutation()
    return bytes(data)


def _fuzz_inputs(valid: Message | None, rng: random.Random) -> list[bytes]:
    inputs = [rng.randbytes(rng.randrange(1, 48)) for _ in range(_FUZZ_PER_METHOD // 2)]
    seed = valid.SerializeToString() if valid is not None else rng.randbytes(16)
    inputs += [
        _mutated(seed, rng) if valid is not None else rng.randbytes(rng.randrange(48, 256))
        for _ in range(_FUZZ_PER_METHOD - len(inputs))
    ]
    return inputs


def _decodes(request_type: type[Message], raw: bytes) -> bool:
    try:
        request_type.FromString(raw)
    except DecodeError:
        return False
    return True


async def _outcome(channel: grpc.aio.Channel, path: str, raw: bytes, streaming: bool) -> Any:
    try:
        if streaming:
            async for _ in channel.unary_stream(path)(raw, timeout=5):
                pass
        else:
            await channel.unary_unary(path)(raw, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc
    return grpc.StatusCode.OK


async def test_fuzzed_requests_through_the_gateway_are_never_unknown(platform: Platform) -> None:
    rng = random.Random(_FUZZ_SEED)
    undecodable = 0
    for path, (request_type, valid, streaming) in _FUZZED.items():
        for raw in _fuzz_inputs(valid, rng):
            outcome = await _outcome(platform.channel, path, raw, streaming)
            code = outcome.code() if isinstance(outcome, grpc.aio.AioRpcError) else outcome
            if _decodes(request_type, raw):
                assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
                    path,
                    raw,
                    outcome,
                )
                continue
            undecodable += 1
            details = (
                details_of(outcome.trailing_metadata()) if code != grpc.StatusCode.OK else None
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, raw, outcome)
            assert details is not None and (details.reason, details.domain) == (
                "MALFORMED_REQUEST",
                "scheduler.plinth",
            ), (path, raw, outcome)
    # The generator must really produce undecodable input, or the test proves nothing.
    assert undecodable >= len(_FUZZED) * _FUZZ_PER_METHOD // 4


async def test_fuzzed_watch_request_is_invalid_argument_from_the_gateway(
    platform: Platform,
) -> None:
    rng = random.Random(_FUZZ_SEED)
    path = "/plinth.gateway.v1.EventService/WatchEvents"
    valid = gateway_pb2.WatchEventsRequest(types=["job.finished"], team="ml").SerializeToString()
    candidates = [rng.randbytes(rng.randrange(1, 48)) for _ in range(20)]
    candidates += [_mutated(valid, rng) for _ in range(40)]
    # Only undecodable ones: a request that decodes may be a valid, never-ending watch.
    undecodable = [raw for raw in candidates if not _decodes(gateway_pb2.WatchEventsRequest, raw)]
    assert len(undecodable) >= 20
    for raw in undecodable:
        outcome = await _outcome(platform.channel, path, raw, True)
        assert isinstance(outcome, grpc.aio.AioRpcError), raw
        details = details_of(outcome.trailing_metadata())
        assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, (raw, outcome)
        assert (details.reason, details.domain) == ("MALFORMED_REQUEST", "gateway.plinth")


# --------------------------------------------------------------------------- dead letters


@dataclass
class DeadLetterBench:
    """The gateway's event service with its dead letters (as the gateway app wires it), a
    bus to publish on, and consumers whose handler can be broken and fixed."""

    bus: EventBus
    db: Database
    processed: sa.Table
    client: Plinth
    consumers: list[EventConsumer]

    def consume(self, durable: str, handler: Callable[[CloudEvent], None]) -> EventConsumer:
        async def handle(session: AsyncSession, event: CloudEvent, payload: Message) -> None:
            handler(event)

        consumer = EventConsumer(
            self.bus,
            self.db,
            self.processed,
            ConsumerSettings(
                durable=durable,
                subjects=["plinth.features.materialized"],
                max_deliver=2,
                backoff_s=(0.05,),
            ),
            handle,
        )
        self.consumers.append(consumer)
        return consumer

    async def publish(self, view: str) -> CloudEvent:
        event = new_event(
            events_pb2.FeaturesMaterialized(feature_views=[view]),
            source="/plinth/test",
            subject=view,
            team="ml",
        )
        await self.bus.js.publish(event.type, event.data, headers=event.headers())
        return event


@pytest_asyncio.fixture(loop_scope="session")
async def bench(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[DeadLetterBench]:
    bus = EventBus(nats_server.url, name="test-dlq")
    await bus.start()
    await bus.connected()
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'processed.db'}")
    metadata = sa.MetaData()
    _, processed = event_tables(metadata)
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    server = GrpcServer(host="127.0.0.1", port=0, domain="gateway.plinth")
    server.add(
        gateway_pb2_grpc.add_EventServiceServicer_to_server,
        EventServicer(EventStreams(NatsEventSource(bus)), DeadLetters(NatsDeadLetterStore(bus))),
        gateway_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    )
    port = await server.start()
    client = Plinth(f"127.0.0.1:{port}", timeout=10)
    consumers: list[EventConsumer] = []
    yield DeadLetterBench(bus, db, processed, client, consumers)
    client.close()
    for consumer in consumers:
        await consumer.stop()
    await server.stop(0)
    await bus.stop()
    await db.close()


async def test_a_poison_event_is_listed_shown_and_replayed_once_the_handler_is_fixed(
    bench: DeadLetterBench,
) -> None:
    run = uuid.uuid4().hex[:8]
    broken = True
    fixed_saw: list[str] = []
    healthy_saw: list[str] = []

    view = f"view-{run}"

    # New durable consumers start at the stream's first event: other tests' events of the same
    # type in this session are not this test's, so the handlers pass them by.
    def fragile(event: CloudEvent) -> None:
        if event.subject != view:
            return
        if broken:
            raise RuntimeError(f"cannot parse view {event.subject}")
        fixed_saw.append(event.id)

    def sound(event: CloudEvent) -> None:
        if event.subject == view:
            healthy_saw.append(event.id)

    # Two consumers of the subject: one healthy all along, one whose handler is broken.
    healthy = bench.consume(f"dlq-healthy-{run}", sound)
    fragile_consumer = bench.consume(f"dlq-fragile-{run}", fragile)
    for consumer in (healthy, fragile_consumer):
        await consumer.start()
    event = await bench.publish(f"view-{run}")

    async def listed() -> list[DeadLetter]:
        return await asyncio.to_thread(
            lambda: list(bench.client.events.dead_letters(consumer=f"dlq-fragile-{run}"))
        )

    (letter,) = await eventually(listed, timeout=15)
    assert (letter.event_id, letter.event_type, letter.subject) == (
        event.id,
        "plinth.features.materialized",
        "plinth.features.materialized",
    )
    assert (letter.event_subject, letter.team, letter.deliveries) == (f"view-{run}", "ml", 2)
    assert letter.reason == f"RuntimeError: cannot parse view view-{run}"
    assert letter.dead_lettered_at is not None and letter.data == {"feature_views": [f"view-{run}"]}
    assert healthy_saw == [event.id] and fixed_saw == []
    # Listing filters by type and team as well.
    by_type = await asyncio.to_thread(
        lambda: [d.sequence for d in bench.client.events.dead_letters(type="features.materialized")]
    )
    assert letter.sequence in by_type
    assert not await asyncio.to_thread(
        lambda: list(bench.client.events.dead_letters(consumer=f"dlq-fragile-{run}", team="nlp"))
    )

    shown = await asyncio.to_thread(bench.client.events.dead_letter, letter.sequence)
    assert shown == letter

    broken = False
    replayed = await asyncio.to_thread(bench.client.events.replay, letter.sequence)
    assert replayed.dead_letter.event_id == event.id and replayed.event_sequence > 0
    await eventually(lambda: _true(fixed_saw == [event.id]), timeout=15)
    # The healthy consumer got the replay too, and recognised the event: no second effect.
    await eventually(lambda: _true(healthy.duplicates == 1), timeout=15)
    assert healthy_saw == [event.id] and fixed_saw == [event.id]
    assert await listed() == []
    with pytest.raises(PlinthNotFound, match="replayed already"):
        await asyncio.to_thread(bench.client.events.replay, letter.sequence)


async def _true(value: bool) -> bool:
    return value


async def test_dead_letter_requests_are_checked(bench: DeadLetterBench) -> None:
    with pytest.raises(PlinthInvalidArgument, match="sequence"):
        await asyncio.to_thread(bench.client.events.dead_letter, 0)
    with pytest.raises(PlinthInvalidArgument, match="page_token"):
        await asyncio.to_thread(
            bench.client.events._transport.unary,
            bench.client.events._stub.ListDeadLetters,
            gateway_pb2.ListDeadLettersRequest(page_token="bogus"),
        )


async def test_fuzzed_dead_letter_requests_are_never_internal_or_unavailable(
    bench: DeadLetterBench,
) -> None:
    # Against a real NATS: odd sequences, types and tokens are the caller's mistake (or simply
    # not there), never "NATS is down" nor an internal error.
    rng = random.Random(_FUZZ_SEED)
    requests: list[tuple[str, Message]] = [
        ("ListDeadLetters", gateway_pb2.ListDeadLettersRequest(type="job.>")),
        ("ListDeadLetters", gateway_pb2.ListDeadLettersRequest(type="a b", page_size=-1)),
        ("ListDeadLetters", gateway_pb2.ListDeadLettersRequest(type="é", team="\x00")),
        ("ListDeadLetters", gateway_pb2.ListDeadLettersRequest(page_size=2**31 - 1)),
        ("GetDeadLetter", gateway_pb2.GetDeadLetterRequest(sequence=2**64 - 1)),
        ("ReplayDeadLetter", gateway_pb2.ReplayDeadLetterRequest(sequence=2**63)),
    ]
    raws = [(name, message.SerializeToString()) for name, message in requests]
    for name in ("ListDeadLetters", "GetDeadLetter", "ReplayDeadLetter"):
        raws += [(name, rng.randbytes(rng.randrange(1, 32))) for _ in range(_FUZZ_PER_METHOD)]
    async with grpc.aio.insecure_channel(bench.client.target) as channel:
        for name, raw in raws:
            path = f"/plinth.gateway.v1.EventService/{name}"
            outcome = await _outcome(channel, path, raw, streaming=False)
            code = outcome.code() if isinstance(outcome, grpc.aio.AioRpcError) else outcome
            assert code in (
                grpc.StatusCode.OK,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            ), (name, raw, outcome)
