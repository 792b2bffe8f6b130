"""The gateway with authentication on: a real gateway (SQLite store, real nats-server), a
recording upstream in place of the scheduler and of serving, and an OIDC issuer on loopback.

What a user notices: no credential or a revoked key is UNAUTHENTICATED; keys, teams and members
through IdentityService; an unknown method is denied; a flood is RESOURCE_EXHAUSTED with
RetryInfo; mutating calls and denials land in the audit log and as ``plinth.audit.recorded``
events; WatchEvents shows only the caller's teams; dead letters are admin-only; forwarded calls
carry a verifiable identity and never the bearer token; no key material in logs, audit rows or
events; the bootstrap admin key file.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import service_pb2 as inference_pb2
from tritonclient.grpc import service_pb2_grpc as inference_grpc

from plinth.events.v1 import events_pb2
from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.auth import (
    PRINCIPAL_HEADER,
    Principal,
    ServiceAuthInterceptor,
    current_principal,
)
from plinth_common.devstack import LocalPlatform, PlatformConfig
from plinth_common.errors import NotFound
from plinth_common.events import EventBus
from plinth_common.events.envelope import new_event
from plinth_common.grpc_server import GrpcServer
from plinth_common.nats_server import NatsServer
from plinth_common.rich_status import details_of
from services.gateway.app import GatewayApp, GatewaySettings
from services.gateway.auth import GatewayAuthInterceptor
from services.gateway.servicer import WATCH_LIVE
from tests.helpers import TEST_TOKENS, EventRecorder, eventually, service_env
from tests.unit.gateway.test_oidc import AUDIENCE, Issuer, serve_issuer

pytestmark = pytest.mark.asyncio(loop_scope="session")

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SCHEDULER = pb.DESCRIPTOR.services_by_name["SchedulerService"].full_name


@dataclass
class Seen:
    """What the recording upstream received: metadata and the verified caller, per call."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    callers: list[Principal] = field(default_factory=list)

    def note(self, context: grpc.aio.ServicerContext) -> None:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        self.callers.append(current_principal())


class RecordingScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        self.seen.note(context)
        return pb.Job(id=request.job_id, spec=pb.JobSpec(name="j", team="vision"))

    async def SubmitJob(
        self, request: pb.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitJobResponse:
        self.seen.note(context)
        return pb.SubmitJobResponse(job=pb.Job(id="j-new", spec=request.spec))


class RecordingServing(inference_grpc.GRPCInferenceServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def ModelInfer(
        self, request: inference_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelInferResponse:
        self.seen.note(context)
        raise NotFound("deployment", request.model_name)

    async def RepositoryIndex(
        self, request: inference_pb2.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.RepositoryIndexResponse:
        return inference_pb2.RepositoryIndexResponse()


@dataclass
class Edge:
    gateway: GatewayApp
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession
    seen: Seen
    issuer: Issuer
    nats_url: str
    key_file: Path

    @property
    def admin(self) -> str:
        return self.gateway.admin_key

    @property
    def identity(self) -> gateway_pb2_grpc.IdentityServiceStub:
        return gateway_pb2_grpc.IdentityServiceStub(self.channel)

    @property
    def events(self) -> gateway_pb2_grpc.EventServiceStub:
        return gateway_pb2_grpc.EventServiceStub(self.channel)

    @property
    def jobs(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    async def team_with(self, **members: int) -> tuple[str, dict[str, str]]:
        """A new team, its members (user=role), and an API key of each: (team, user -> key)."""
        team = f"t-{uuid.uuid4().hex[:8]}"
        admin = bearer(self.admin)
        await self.identity.CreateTeam(gateway_pb2.CreateTeamRequest(name=team), metadata=admin)
        keys = {}
        for user, role in members.items():
            name = f"{user}-{team}"
            await self.identity.AddMember(
                gateway_pb2.AddMemberRequest(team=team, user=name, role=role), metadata=admin
            )
            created = await self.identity.CreateApiKey(
                gateway_pb2.CreateApiKeyRequest(name="test", owner=name), metadata=admin
            )
            keys[user] = created.secret
        return team, keys


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _upstream(seen: Seen) -> GrpcServer:
    server = GrpcServer(
        host="127.0.0.1", port=0, interceptors=[ServiceAuthInterceptor(TEST_TOKENS)]
    )
    server.add(
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
        RecordingScheduler(seen),
        SCHEDULER,
    )
    server.add(
        inference_grpc.add_GRPCInferenceServiceServicer_to_server, RecordingServing(seen), INFERENCE
    )
    await server.start()
    await server.set_serving(True)
    return server


def _settings(
    tmp: Path, nats_url: str, upstream: int, issuer: Issuer, **extra: str
) -> GatewaySettings:
    return GatewaySettings.from_env(
        service_env(
            tmp,
            nats_url,
            PLINTH_SCHEDULER_ADDR=f"127.0.0.1:{upstream}",
            PLINTH_SERVING_ADDR=f"127.0.0.1:{upstream}",
            PLINTH_REGISTRY_ADDR=f"127.0.0.1:{upstream}",
            PLINTH_FEATURES_ADDR=f"127.0.0.1:{upstream}",
            PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE=str(tmp / "run" / "admin.key"),
            PLINTH_GATEWAY_RATE_VIEWER="20:20",
            PLINTH_OIDC_ISSUER=issuer.url,
            PLINTH_OIDC_AUDIENCE=AUDIENCE,
            PLINTH_OIDC_JWKS_REFETCH_S="0",
            **extra,
        )
    )


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def edge(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer
) -> AsyncIterator[Edge]:
    async with serve_issuer() as issuer:
        tmp = tmp_path_factory.mktemp("gateway-auth")
        seen = Seen()
        upstream = await _upstream(seen)
        gateway = GatewayApp(_settings(tmp, nats_server.url, upstream.port, issuer))
        await gateway.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        http = aiohttp.ClientSession(f"http://127.0.0.1:{gateway.http_port}")
        yield Edge(gateway, channel, http, seen, issuer, nats_server.url, tmp / "run" / "admin.key")
        await http.close()
        await channel.close()
        await gateway.stop()
        await upstream.stop(0)


async def _code(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


# --------------------------------------------------------------------------- credentials


async def test_no_credential_is_unauthenticated_with_a_reason(edge: Edge) -> None:
    error = await _code(edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in (error.details() or "")
    assert details_of(error.trailing_metadata()).reason == "UNAUTHENTICATED"
    error = await _code(edge.jobs.GetJob(pb.GetJobRequest(job_id="j-1")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert edge.seen.metadata == [] or all("authorization" not in m for m in edge.seen.metadata)


async def test_a_bad_key_says_so_alike_for_unknown_ids_and_wrong_secrets(edge: Edge) -> None:
    real = edge.admin.split("_")[1]
    for token in (f"plk_{real}_{'x' * 43}", f"plk_{'0' * 12}_{'x' * 43}"):
        error = await _code(
            edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bearer(token))
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == "the API key is not valid"


async def test_whoami_names_the_caller_their_teams_and_key(edge: Edge) -> None:
    me = await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bearer(edge.admin))
    assert (me.name, me.admin, me.via, me.kind) == ("admin", True, "api_key", "user")
    assert me.key_id == edge.admin.split("_")[1]
    team, keys = await edge.team_with(ann=gateway_pb2.ROLE_DEVELOPER)
    ann = await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bearer(keys["ann"]))
    assert not ann.admin
    assert [(t.team, t.role) for t in ann.teams] == [(team, gateway_pb2.ROLE_DEVELOPER)]


async def test_keys_are_created_listed_and_revoked_at_once(edge: Edge) -> None:
    _, keys = await edge.team_with(ann=gateway_pb2.ROLE_VIEWER)
    ann = bearer(keys["ann"])
    laptop = await edge.identity.CreateApiKey(
        gateway_pb2.CreateApiKeyRequest(name="laptop"), metadata=ann
    )
    assert laptop.secret.startswith(f"plk_{laptop.key.id}_") and not laptop.key.admin
    listed = await edge.identity.ListApiKeys(gateway_pb2.ListApiKeysRequest(), metadata=ann)
    assert {k.name for k in listed.keys} == {"test", "laptop"}
    assert laptop.secret not in str(listed)
    # Someone else's key, a service account or an admin key: admins only.
    for request in (
        gateway_pb2.CreateApiKeyRequest(name="x", owner="admin"),
        gateway_pb2.CreateApiKeyRequest(name="x", service_account=True),
        gateway_pb2.CreateApiKeyRequest(name="x", admin=True),
    ):
        error = await _code(edge.identity.CreateApiKey(request, metadata=ann))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    new = bearer(laptop.secret)
    await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=new)  # cached now
    await edge.identity.RevokeApiKey(
        gateway_pb2.RevokeApiKeyRequest(id=laptop.key.id), metadata=ann
    )
    error = await _code(edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=new))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (error.details() or "")
    await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=ann)  # the other key works


async def test_teams_and_members(edge: Edge) -> None:
    team, keys = await edge.team_with(ann=gateway_pb2.ROLE_MAINTAINER, bob=gateway_pb2.ROLE_VIEWER)
    other, other_keys = await edge.team_with(cy=gateway_pb2.ROLE_VIEWER)
    ann = bearer(keys["ann"])
    listed = await edge.identity.ListTeams(gateway_pb2.ListTeamsRequest(), metadata=ann)
    assert [(t.name, t.member_count, t.my_role) for t in listed.teams] == [
        (team, 2, gateway_pb2.ROLE_MAINTAINER)
    ]
    members = await edge.identity.ListMembers(
        gateway_pb2.ListMembersRequest(team=team), metadata=ann
    )
    assert sorted(m.user for m in members.members) == [f"ann-{team}", f"bob-{team}"]
    error = await _code(
        edge.identity.ListMembers(gateway_pb2.ListMembersRequest(team=other), metadata=ann)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and other in (error.details() or "")
    # A maintainer is no admin: members are managed by admins.
    error = await _code(
        edge.identity.AddMember(
            gateway_pb2.AddMemberRequest(team=team, user="zed", role=gateway_pb2.ROLE_VIEWER),
            metadata=ann,
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    everything = await edge.identity.ListTeams(
        gateway_pb2.ListTeamsRequest(), metadata=bearer(edge.admin)
    )
    assert {team, other} <= {t.name for t in everything.teams}
    # Removing bob takes effect on his next call.
    bob = bearer(keys["bob"])
    assert (await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bob)).teams
    await edge.identity.RemoveMember(
        gateway_pb2.RemoveMemberRequest(team=team, user=f"bob-{team}"), metadata=bearer(edge.admin)
    )
    assert not (await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bob)).teams
    assert other_keys


# --------------------------------------------------------------------------- authorization


async def test_a_method_without_a_rule_is_denied(edge: Edge) -> None:
    # Served, but in no row of the authorization table (Triton's repository API).
    server = GrpcServer(
        host="127.0.0.1", port=0, interceptors=[GatewayAuthInterceptor(edge.gateway.edge)]
    )
    server.add(
        inference_grpc.add_GRPCInferenceServiceServicer_to_server,
        RecordingServing(Seen()),
        INFERENCE,
    )
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_grpc.GRPCInferenceServiceStub(channel)
            error = await _code(
                stub.RepositoryIndex(
                    inference_pb2.RepositoryIndexRequest(), metadata=bearer(edge.admin)
                )
            )
    finally:
        await server.stop(0)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "has no authorization rule" in (error.details() or "")
    # Not served by the gateway at all.
    error = await _code(
        edge.channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")(
            b"", metadata=bearer(edge.admin)
        )
    )
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_role_below_the_rule_is_denied_before_forwarding(edge: Edge) -> None:
    team, keys = await edge.team_with(vic=gateway_pb2.ROLE_VIEWER)
    before = len(edge.seen.metadata)
    error = await _code(
        edge.jobs.SubmitJob(
            pb.SubmitJobRequest(spec=pb.JobSpec(name="x", team=team, entrypoint=["true"])),
            metadata=bearer(keys["vic"]),
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "jobs.submit needs developer"
    assert len(edge.seen.metadata) == before  # never reached the scheduler


async def test_a_flood_is_resource_exhausted_with_retry_info(edge: Edge) -> None:
    _, keys = await edge.team_with(rita=gateway_pb2.ROLE_VIEWER)  # viewers: 20/s, burst 20
    rita = bearer(keys["rita"])
    outcomes = []
    for _ in range(30):
        try:
            await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=rita)
            outcomes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as exc:
            outcomes.append(exc.code())
            refused = exc
    assert outcomes[:20] == [grpc.StatusCode.OK] * 20
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes[20:]
    details = details_of(refused.trailing_metadata())
    assert details.reason == "RESOURCE_EXHAUSTED"
    assert details.retry_after_s is not None and 0 < details.retry_after_s <= 1
    # The admin's own bucket is untouched.
    await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bearer(edge.admin))


# --------------------------------------------------------------------------- forwarding


async def test_forwarded_calls_carry_a_verifiable_identity_and_never_the_bearer_token(
    edge: Edge,
) -> None:
    team, keys = await edge.team_with(dev=gateway_pb2.ROLE_DEVELOPER)
    forged = TEST_TOKENS.mint(Principal("mallory", admin=True))
    metadata = (*bearer(keys["dev"]), (PRINCIPAL_HEADER, forged))
    before = len(edge.seen.metadata)
    job = await edge.jobs.GetJob(pb.GetJobRequest(job_id="j-42"), metadata=metadata)
    assert job.id == "j-42"
    await edge.jobs.SubmitJob(
        pb.SubmitJobRequest(spec=pb.JobSpec(name="x", team=team, entrypoint=["true"])),
        metadata=metadata,
    )
    for received, caller in zip(
        edge.seen.metadata[before:], edge.seen.callers[before:], strict=True
    ):
        assert "authorization" not in received
        assert keys["dev"] not in str(received)
        assert received[PRINCIPAL_HEADER] != forged
        assert caller.name == f"dev-{team}" and not caller.admin
        assert dict(caller.teams) == {team: 2} and caller.via == "api_key"


async def test_http_inference_authenticates_and_forwards_the_identity(edge: Edge) -> None:
    async with edge.http.get("/healthz") as page:
        assert page.status in (200, 503)  # public: never 401
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}'
    async with edge.http.post("/v2/models/fraud/infer", data=body) as reply:
        payload = await reply.json()
    assert reply.status == 401 and payload["reason"] == "UNAUTHENTICATED"
    async with edge.http.post(
        "/v2/models/fraud/infer", data=body, headers={"Authorization": "Bearer plk_nope"}
    ) as reply:
        assert reply.status == 401 and (await reply.json())["error"] == "the API key is malformed"
    _, keys = await edge.team_with(hal=gateway_pb2.ROLE_VIEWER)
    before = len(edge.seen.callers)
    async with edge.http.post(
        "/v2/models/fraud/infer", data=body, headers={"Authorization": f"Bearer {keys['hal']}"}
    ) as reply:
        payload = await reply.json()
    assert reply.status == 404 and payload["reason"] == "NOT_FOUND"  # serving's answer
    (caller,) = edge.seen.callers[before:]
    assert caller.name.startswith("hal-")
    assert "authorization" not in edge.seen.metadata[-1]


async def test_http_refusals_are_403_and_429_with_the_json_error_body(edge: Edge) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}'
    loner = await edge.identity.CreateApiKey(
        gateway_pb2.CreateApiKeyRequest(name="k", owner=f"loner-{uuid.uuid4().hex[:6]}"),
        metadata=bearer(edge.admin),
    )
    async with edge.http.post(
        "/v2/models/fraud/infer", data=body, headers={"Authorization": f"Bearer {loner.secret}"}
    ) as reply:
        payload = await reply.json()
    assert reply.status == 403  # in no team: no inference anywhere
    assert payload == {
        "error": "inference.call needs viewer",
        "reason": "PERMISSION_DENIED",
        "details": {"permission": "inference.call"},
    }
    _, keys = await edge.team_with(flo=gateway_pb2.ROLE_VIEWER)  # viewers: 20/s, burst 20
    statuses = []
    for _ in range(30):
        async with edge.http.get(
            "/v2/models/fraud/ready", headers={"Authorization": f"Bearer {keys['flo']}"}
        ) as reply:
            statuses.append(reply.status)
            if reply.status == 429:
                limited = (reply.headers.get("Retry-After"), (await reply.json())["reason"])
    assert 429 in statuses
    assert limited == ("1", "RESOURCE_EXHAUSTED")


# --------------------------------------------------------------------------- events


async def _publish(bus: EventBus, team: str, view: str) -> None:
    event = new_event(
        events_pb2.FeaturesMaterialized(feature_views=[view]),
        source="/plinth/test",
        subject=view,
        team=team,
    )
    await bus.js.publish(event.type, event.data, headers=event.headers())


async def test_watch_events_delivers_only_the_callers_teams(edge: Edge) -> None:
    a, a_keys = await edge.team_with(amy=gateway_pb2.ROLE_VIEWER)
    b, _ = await edge.team_with(ben=gateway_pb2.ROLE_VIEWER)
    run = uuid.uuid4().hex[:6]
    seen: dict[str, list[gateway_pb2.Event]] = {"amy": [], "admin": []}
    tasks = []
    for who, key in (("amy", a_keys["amy"]), ("admin", edge.admin)):
        stream = edge.events.WatchEvents(
            gateway_pb2.WatchEventsRequest(types=["features.materialized"]), metadata=bearer(key)
        )
        assert WATCH_LIVE in tuple(await stream.initial_metadata())

        async def collect(
            stream: object = stream, into: list[gateway_pb2.Event] = seen[who]
        ) -> None:
            async for event in stream:  # type: ignore[attr-defined]
                into.append(event)

        tasks.append(asyncio.create_task(collect()))
    bus = EventBus(edge.nats_url, name="test-watch-auth")
    await bus.start()
    await bus.connected()
    try:
        await _publish(bus, b, f"b-{run}")
        await _publish(bus, "", f"none-{run}")
        await _publish(bus, a, f"a-{run}")

        async def admin_saw_all() -> bool:
            return len([e for e in seen["admin"] if e.subject.endswith(run)]) == 3

        await eventually(admin_saw_all, timeout=10)

        async def amy_saw_hers() -> bool:
            return any(e.subject == f"a-{run}" for e in seen["amy"])

        await eventually(amy_saw_hers, timeout=10)
    finally:
        for task in tasks:
            task.cancel()
        await bus.stop()
    assert [e.subject for e in seen["amy"] if e.subject.endswith(run)] == [f"a-{run}"]
    # Naming another team: NOT_FOUND team, as if it did not exist.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in edge.events.WatchEvents(
            gateway_pb2.WatchEventsRequest(team=b), metadata=bearer(a_keys["amy"])
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and b in (caught.value.details() or "")


async def test_dead_letters_are_admin_only(edge: Edge) -> None:
    _, keys = await edge.team_with(mo=gateway_pb2.ROLE_MAINTAINER)
    error = await _code(
        edge.events.ListDeadLetters(
            gateway_pb2.ListDeadLettersRequest(), metadata=bearer(keys["mo"])
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "deadletters.read needs admin"
    await edge.events.ListDeadLetters(
        gateway_pb2.ListDeadLettersRequest(), metadata=bearer(edge.admin)
    )


# --------------------------------------------------------------------------- audit


async def test_mutations_and_denials_are_audited_and_published(edge: Edge) -> None:
    async with EventRecorder(edge.nats_url) as recorder:
        team, keys = await edge.team_with(val=gateway_pb2.ROLE_VIEWER)
        val = bearer(keys["val"])
        await _code(
            edge.jobs.SubmitJob(
                pb.SubmitJobRequest(spec=pb.JobSpec(name="x", team=team, entrypoint=["true"])),
                metadata=val,
            )
        )
        admin = bearer(edge.admin)

        async def records() -> list[gateway_pb2.AuditRecord]:
            page = await edge.identity.ListAuditRecords(
                gateway_pb2.ListAuditRecordsRequest(team=team), metadata=admin
            )
            methods = {r.method.rsplit("/", 1)[1] for r in page.records}
            return list(page.records) if {"SubmitJob", "AddMember"} <= methods else []

        found = await eventually(records, timeout=10)
        by_method = {r.method.rsplit("/", 1)[1]: r for r in found}
        denied = by_method["SubmitJob"]
        assert (denied.principal, denied.outcome, denied.permission) == (
            f"val-{team}",
            "PERMISSION_DENIED",
            "jobs.submit",
        )
        assert denied.team == team and denied.message == "jobs.submit needs developer"
        created = by_method["AddMember"]
        assert (created.principal, created.outcome, created.resource) == (
            "admin",
            "OK",
            f"val-{team}@{team}",
        )

        async def published() -> list[gateway_pb2.AuditRecord]:
            records = [
                gateway_pb2.AuditRecord.FromString(m.data)
                for m in recorder.messages
                if m.subject == "plinth.audit.recorded" and (m.headers or {}).get("ce-team") == team
            ]
            return records if {r.id for r in records} >= {denied.id, created.id} else []

        events = await eventually(published, timeout=10)
        assert {e.principal for e in events} >= {"admin", f"val-{team}"}
    denials = await edge.identity.ListAuditRecords(
        gateway_pb2.ListAuditRecordsRequest(team=team, denials_only=True), metadata=admin
    )
    assert [r.method.rsplit("/", 1)[1] for r in denials.records] == ["SubmitJob"]
    error = await _code(
        edge.identity.ListAuditRecords(gateway_pb2.ListAuditRecordsRequest(), metadata=val)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_key_material_never_shows_in_logs_traces_audit_rows_or_events(
    edge: Edge, caplog: pytest.LogCaptureFixture, spans: InMemorySpanExporter
) -> None:
    caplog.set_level(logging.DEBUG)
    async with EventRecorder(edge.nats_url) as recorder:
        _, keys = await edge.team_with(sue=gateway_pb2.ROLE_VIEWER)
        sue = bearer(keys["sue"])
        created = await edge.identity.CreateApiKey(
            gateway_pb2.CreateApiKeyRequest(name="spare"), metadata=sue
        )
        wrong = f"plk_{created.key.id}_{'Q' * 43}"
        for token in (created.secret, wrong, "garbage-token-value", keys["sue"]):
            try:
                await edge.jobs.SubmitJob(
                    pb.SubmitJobRequest(spec=pb.JobSpec(name="x", team="t", entrypoint=["true"])),
                    metadata=bearer(token),
                )
            except grpc.aio.AioRpcError as exc:
                assert token not in (exc.details() or "")
        await edge.identity.RevokeApiKey(
            gateway_pb2.RevokeApiKeyRequest(id=created.key.id), metadata=sue
        )
        await _code(
            edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bearer(created.secret))
        )

        async def settled() -> bool:
            return edge.gateway.audit.pending == 0 and any(
                m.subject == "plinth.audit.recorded" for m in recorder.messages
            )

        await eventually(settled, timeout=10)
        await asyncio.sleep(0.3)
        audit = await edge.identity.ListAuditRecords(
            gateway_pb2.ListAuditRecordsRequest(page_size=500), metadata=bearer(edge.admin)
        )
        published = b"".join(m.data + str(m.headers).encode() for m in recorder.messages)
    traced = str([(s.name, dict(s.attributes or {}), s.events) for s in spans.get_finished_spans()])
    assert "SubmitJob" in traced  # the calls were traced
    secrets = [created.secret, keys["sue"], edge.admin, "Q" * 43, "garbage-token-value"]
    secret_parts = [s.rsplit("_", 1)[-1] for s in secrets]
    for secret in secrets + secret_parts:
        assert secret not in caplog.text
        assert secret not in traced
        assert secret not in str(audit)
        assert secret.encode() not in published


async def test_audit_records_are_paged_and_filtered_by_principal(edge: Edge) -> None:
    admin = bearer(edge.admin)
    team, keys = await edge.team_with(pam=gateway_pb2.ROLE_VIEWER)
    for _ in range(3):
        await _code(
            edge.identity.CreateTeam(
                gateway_pb2.CreateTeamRequest(name="nope"), metadata=bearer(keys["pam"])
            )
        )
    request = gateway_pb2.ListAuditRecordsRequest(principal=f"pam-{team}", page_size=2)

    async def first_page() -> gateway_pb2.ListAuditRecordsResponse | None:
        page = await edge.identity.ListAuditRecords(request, metadata=admin)
        return page if page.next_page_token else None

    page = await eventually(first_page, timeout=10)
    request.page_token = page.next_page_token
    rest = await edge.identity.ListAuditRecords(request, metadata=admin)
    records = [*page.records, *rest.records]
    assert len(records) == 3 and not rest.next_page_token
    assert [r.id for r in records] == sorted((r.id for r in records), reverse=True)
    assert {(r.outcome, r.resource) for r in records} == {("PERMISSION_DENIED", "nope")}


# --------------------------------------------------------------------------- OIDC


async def test_an_oidc_token_is_accepted_with_claim_and_stored_teams(edge: Edge) -> None:
    team, _ = await edge.team_with()
    await edge.identity.AddMember(
        gateway_pb2.AddMemberRequest(team=team, user="olga", role=gateway_pb2.ROLE_MAINTAINER),
        metadata=bearer(edge.admin),
    )
    token = edge.issuer.token(preferred_username="olga", groups=["claimed:developer"])
    me = await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bearer(token))
    assert (me.name, me.via, me.key_id) == ("olga", "oidc", "")
    assert {(t.team, t.role) for t in me.teams} == {
        ("claimed", gateway_pb2.ROLE_DEVELOPER),
        (team, gateway_pb2.ROLE_MAINTAINER),
    }
    expired = edge.issuer.token(exp=1)
    error = await _code(edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bearer(expired)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in (error.details() or "")


async def test_an_unreachable_jwks_endpoint_locks_out_no_api_key_user(edge: Edge) -> None:
    edge.issuer.down = True
    try:
        stranger = Issuer(url=edge.issuer.url)
        stranger.add_rsa("rotated-away")
        error = await _code(
            edge.identity.WhoAmI(
                gateway_pb2.WhoAmIRequest(), metadata=bearer(stranger.token("rotated-away"))
            )
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bearer(edge.admin))
        # A key fetched before keeps working.
        token = edge.issuer.token(preferred_username="olaf")
        assert (
            await edge.identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=bearer(token))
        ).name == "olaf"
    finally:
        edge.issuer.down = False


# --------------------------------------------------------------------------- bootstrap


async def test_the_bootstrap_admin_key_is_private_reused_and_replaced_when_revoked(
    edge: Edge, tmp_path: Path, nats_server: NatsServer
) -> None:
    assert edge.key_file.stat().st_mode & 0o777 == 0o600
    assert edge.key_file.read_text().strip() == edge.admin
    settings = _settings(tmp_path, nats_server.url, 1, edge.issuer)
    first = GatewayApp(settings)
    await first.start()
    key = first.admin_key
    await first.stop()
    again = GatewayApp(settings)
    await again.start()
    try:
        assert again.admin_key == key  # reused: it still verifies
        async with grpc.aio.insecure_channel(f"127.0.0.1:{again.port}") as channel:
            identity = gateway_pb2_grpc.IdentityServiceStub(channel)
            await identity.RevokeApiKey(
                gateway_pb2.RevokeApiKeyRequest(id=key.split("_")[1]), metadata=bearer(key)
            )
    finally:
        await again.stop()
    replaced = GatewayApp(settings)
    await replaced.start()
    try:
        assert replaced.admin_key != key
        assert (tmp_path / "run" / "admin.key").read_text().strip() == replaced.admin_key
    finally:
        await replaced.stop()


async def test_make_run_writes_the_admin_key_and_reuses_it(tmp_path: Path) -> None:
    # The launcher with only the gateway (its upstreams absent): what `make run` does for keys.
    local = LocalPlatform(PlatformConfig.ephemeral(tmp_path, services=("gateway",)))
    assert local.admin_key == ""
    await local.start(timeout=60)
    try:
        key = local.admin_key
        assert key.startswith("plk_") and local.admin_key_file.stat().st_mode & 0o777 == 0o600
        assert ("admin key", f"{local.admin_key_file}  (0600; the CLI and SDK use it)") in (
            local.endpoints()
        )
        async with grpc.aio.insecure_channel(local.address("gateway")) as channel:
            me = await gateway_pb2_grpc.IdentityServiceStub(channel).WhoAmI(
                gateway_pb2.WhoAmIRequest(), metadata=bearer(key)
            )
        assert me.admin
        await local.stop_service("gateway")
        local.start_service("gateway")
        await local.wait_serving("gateway", timeout=60)
        assert local.admin_key == key
    finally:
        await local.stop()
    assert key not in (local.logs_dir / "gateway.log").read_text()
