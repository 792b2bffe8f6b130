"""Serving's grant feed against a real gateway (SQLite store, real nats-server): API keys made
and revoked through IdentityService reach the data plane's sink (a recording fake here; the
real HAProxy is tests/component/test_dataplane.py) within a second; ``ListKeyDigests`` answers
serving's own identity only; an OIDC token exchanged for a key reaches the data plane with its
claim's teams."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import grpc
import jwt
import pytest
import pytest_asyncio
from aiohttp import web

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth_common.auth import Principal, Role
from plinth_common.nats_server import NatsServer
from plinth_sdk import Plinth
from plinth_sdk.errors import FailedPrecondition
from plinth_sdk.models import NewApiKey
from services.gateway.app import GatewayApp, GatewaySettings
from services.gateway.keys import hash_secret, parse_key
from services.serving.dataplane import Backend, DataPlane, KeyGrant, RouteSpec
from services.serving.domain import DeploymentAccess
from services.serving.gateway_client import GatewayKeys
from services.serving.grants import GrantFeed
from tests.helpers import TEST_TOKENS, eventually, service_env
from tests.unit.gateway.test_oidc import AUDIENCE, Issuer, serve_issuer

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVING = Principal.service("serving")
NOWHERE = "127.0.0.1:9"  # nothing listens there


class Sink:
    """The data plane's place: records each grant set and when it came."""

    def __init__(self) -> None:
        self.grants: dict[str, KeyGrant] = {}
        self.updates: list[float] = []

    async def apply_grants(self, grants: Sequence[KeyGrant]) -> None:
        self.grants = {g.key_id: g for g in grants}
        self.updates.append(time.monotonic())


@dataclass
class Platform:
    gateway: GatewayApp
    channel: grpc.aio.Channel
    target: str
    issuer: Issuer

    @property
    def identity(self) -> gateway_pb2_grpc.IdentityServiceStub:
        return gateway_pb2_grpc.IdentityServiceStub(self.channel)

    @property
    def admin(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.gateway.admin_key}"),)

    async def member_with_key(self, team: str, user: str, role: int) -> str:
        await self.identity.AddMember(
            gateway_pb2.AddMemberRequest(team=team, user=user, role=role), metadata=self.admin
        )
        created = await self.identity.CreateApiKey(
            gateway_pb2.CreateApiKeyRequest(name="t", owner=user), metadata=self.admin
        )
        return created.secret


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def platform(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer
) -> AsyncIterator[Platform]:
    tmp: Path = tmp_path_factory.mktemp("grant-feed")
    nowhere = NOWHERE  # no upstream is called here
    async with serve_issuer() as issuer:
        settings = GatewaySettings.from_env(
            service_env(
                tmp,
                nats_server.url,
                PLINTH_SCHEDULER_ADDR=nowhere,
                PLINTH_SERVING_ADDR=nowhere,
                PLINTH_REGISTRY_ADDR=nowhere,
                PLINTH_FEATURES_ADDR=nowhere,
                PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE=str(tmp / "run" / "admin.key"),
                PLINTH_OIDC_ISSUER=issuer.url,
                PLINTH_OIDC_AUDIENCE=AUDIENCE,
            )
        )
        gateway = GatewayApp(settings)
        await gateway.start()
        target = f"127.0.0.1:{gateway.port}"
        channel = grpc.aio.insecure_channel(target)
        yield Platform(gateway, channel, target, issuer)
        await channel.close()
        await gateway.stop()


async def _team(platform: Platform) -> str:
    team = f"t-{uuid.uuid4().hex[:8]}"
    await platform.identity.CreateTeam(
        gateway_pb2.CreateTeamRequest(name=team), metadata=platform.admin
    )
    return team


async def test_keys_made_and_revoked_at_the_gateway_reach_the_data_plane_within_a_second(
    platform: Platform,
) -> None:
    vision, nlp = await _team(platform), await _team(platform)
    ann = await platform.member_with_key(vision, f"ann-{vision}", gateway_pb2.ROLE_VIEWER)
    access: dict[str, DeploymentAccess] = {
        "churn": DeploymentAccess(team=vision),
        "sentiment": DeploymentAccess(team=nlp),
    }
    source = GatewayKeys(platform.target, tokens=TEST_TOKENS)
    sink = Sink()
    feed = GrantFeed(source=source, sink=sink, access=lambda: access, interval_s=0.25)
    await feed.start()
    try:
        ann_id, ann_secret = parse_key(ann)
        grant = sink.grants[ann_id]
        assert grant.principal == f"ann-{vision}" and grant.deployments == {"churn"}
        # The proxy's check: sha256("<salt>:<secret>") of the presented key equals the hash.
        assert hash_secret(grant.salt, ann_secret) == grant.hash
        admin_id, _ = parse_key(platform.gateway.admin_key)
        assert sink.grants[admin_id].deployments == {"churn", "sentiment"}

        # A membership added at the gateway widens ann's grant.
        await platform.identity.AddMember(
            gateway_pb2.AddMemberRequest(team=nlp, user=f"ann-{vision}", role=1),
            metadata=platform.admin,
        )

        async def widened() -> bool:
            return sink.grants[ann_id].deployments == {"churn", "sentiment"}

        await eventually(widened, timeout=2.0, interval=0.02)

        # Revoked: gone from the data plane's table within a second.
        seen = len(sink.updates)
        await platform.identity.RevokeApiKey(
            gateway_pb2.RevokeApiKeyRequest(id=ann_id), metadata=platform.admin
        )
        revoked_at = time.monotonic()

        async def gone() -> bool:
            return ann_id not in sink.grants

        await eventually(gone, timeout=2.0, interval=0.01)
        took = sink.updates[seen] - revoked_at
        assert took < 1.0, f"revocation reached the data plane after {took:.3f}s"
    finally:
        await feed.stop()
        await source.close()


async def test_an_unchanged_poll_answers_nothing_and_is_cheap(platform: Platform) -> None:
    source = GatewayKeys(platform.target, tokens=TEST_TOKENS)
    try:
        table = await source.key_digests(0)
        assert table is not None and table.keys
        assert await source.key_digests(table.revision) is None

        async def timed(since: int) -> float:
            started = time.perf_counter()
            await source.key_digests(since)
            return (time.perf_counter() - started) * 1000

        cpu = time.process_time()
        unchanged = [await timed(table.revision) for _ in range(100)]
        cpu_ms = (time.process_time() - cpu) * 1000 / 100
        full = [await timed(0) for _ in range(100)]
        # Printed for the record (pytest -s): client and gateway share this process, so the CPU
        # per unchanged poll is what serving and the gateway together spend on it.
        print(
            f"ListKeyDigests p50: unchanged {statistics.median(unchanged):.2f} ms "
            f"({cpu_ms:.2f} ms CPU, both sides), full ({len(table.keys)} keys) "
            f"{statistics.median(full):.2f} ms"
        )
        assert statistics.median(unchanged) < 20

        # A waiting call answers "unchanged" once its wait is over.
        started = time.monotonic()
        assert await source.key_digests(table.revision, wait_s=0.3) is None
        assert 0.3 <= time.monotonic() - started < 2.0
    finally:
        await source.close()


async def test_an_idle_feed_costs_next_to_nothing(platform: Platform) -> None:
    source = GatewayKeys(platform.target, tokens=TEST_TOKENS)
    sink = Sink()
    access = {"churn": DeploymentAccess(team="vision")}
    feed = GrantFeed(source=source, sink=sink, access=lambda: access, interval_s=0.25)
    await feed.start()
    try:
        await asyncio.sleep(0.3)
        updates = len(sink.updates)
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(2.0)
        cpu_ms_per_s = (time.process_time() - cpu) * 1000 / (time.monotonic() - wall)
        # For the record (pytest -s): the gateway's own background work is in it too.
        print(f"idle feed and gateway: {cpu_ms_per_s:.1f} ms CPU per second")
        assert len(sink.updates) == updates, "nothing changed, nothing pushed"
        assert cpu_ms_per_s < 100
    finally:
        await feed.stop()
        await source.close()


def _as(principal: Principal) -> tuple[tuple[str, str]]:
    return (TEST_TOKENS.metadata(principal),)


async def _code(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_only_serving_reads_the_key_table_and_only_there(platform: Platform) -> None:
    identity = platform.identity
    request = gateway_pb2.ListKeyDigestsRequest()
    assert (await identity.ListKeyDigests(request, metadata=_as(SERVING))).changed

    refused = await _code(
        identity.ListKeyDigests(request, metadata=_as(Principal.service("scheduler")))
    )
    assert refused.code() is grpc.StatusCode.PERMISSION_DENIED

    # A user's identity signed with the internal key is no bearer credential at the edge.
    forged = Principal("mallory", teams={"x": Role.MAINTAINER}, admin=True, via="api_key")
    refused = await _code(identity.ListKeyDigests(request, metadata=_as(forged)))
    assert refused.code() is grpc.StatusCode.UNAUTHENTICATED

    team = await _team(platform)
    key = await platform.member_with_key(team, f"max-{team}", gateway_pb2.ROLE_MAINTAINER)
    refused = await _code(
        identity.ListKeyDigests(request, metadata=(("authorization", f"Bearer {key}"),))
    )
    assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "keys.digests needs admin" in (refused.details() or "")
    refused = await _code(identity.ListKeyDigests(request))
    assert refused.code() is grpc.StatusCode.UNAUTHENTICATED

    # Serving's identity opens no other door: not another gateway method, not a forwarded one.
    refused = await _code(identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=_as(SERVING)))
    assert refused.code() is grpc.StatusCode.UNAUTHENTICATED
    jobs = scheduler_pb2_grpc.SchedulerServiceStub(platform.channel)
    refused = await _code(
        jobs.GetJob(scheduler_pb2.GetJobRequest(job_id="j-1"), metadata=_as(SERVING))
    )
    assert refused.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_the_feed_survives_a_gateway_that_is_not_there_yet() -> None:
    # Serving may start before the gateway: nothing is pushed until it answers.
    source = GatewayKeys("127.0.0.1:9", tokens=TEST_TOKENS, timeout_s=0.5)
    sink = Sink()
    access: Mapping[str, DeploymentAccess] = {}
    feed = GrantFeed(source=source, sink=sink, access=lambda: access, interval_s=0.05)
    await feed.start()
    try:
        await asyncio.sleep(0.2)
        assert sink.updates == [] and feed.source_down_since is not None
    finally:
        await feed.stop()
        await source.close()


async def test_an_oidc_token_exchanged_for_a_key_reaches_the_data_plane(
    platform: Platform,
) -> None:
    team = await _team(platform)
    user = f"olga-{team}"
    token = platform.issuer.token(preferred_username=user, groups=[f"{team}:developer"])
    exchanged = await platform.identity.ExchangeToken(
        gateway_pb2.ExchangeTokenRequest(name="laptop"),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    key = exchanged.key
    assert (key.owner, key.name, key.kind) == (user, "laptop", "user")
    claims_expiry = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert key.expires_at.seconds == claims_expiry

    # The key acts as the token did, at the gateway ...
    me = await platform.identity.WhoAmI(
        gateway_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {exchanged.secret}"),)
    )
    assert (me.name, me.via, me.key_id) == (user, "api_key", key.id)
    assert [(t.team, t.role) for t in me.teams] == [(team, gateway_pb2.ROLE_DEVELOPER)]

    # ... and on the data plane: granted the claim's team's deployments.
    source = GatewayKeys(platform.target, tokens=TEST_TOKENS)
    sink = Sink()
    access = {"churn": DeploymentAccess(team=team), "other": DeploymentAccess(team="nobody")}
    feed = GrantFeed(source=source, sink=sink, access=lambda: access)
    try:
        assert await feed.refresh()
        grant = sink.grants[key.id]
        assert grant.principal == user and grant.deployments == {"churn"}
        assert grant.expires_at == claims_expiry
        _, secret = parse_key(exchanged.secret)
        assert hash_secret(grant.salt, secret) == grant.hash
    finally:
        await source.close()

    # The SDK does the same for a client holding the token; an API key is no token to exchange.
    def exchange(credential: str) -> NewApiKey:
        with Plinth(platform.target, api_key=credential) as client:
            return client.keys.exchange("sdk", expires=timedelta(minutes=1))

    by_sdk = await asyncio.to_thread(exchange, token)
    assert by_sdk.key.owner == user and by_sdk.key.name == "sdk"
    assert by_sdk.key.expires_at is not None and by_sdk.key.expires_at.timestamp() < claims_expiry
    with pytest.raises(FailedPrecondition, match="only an OIDC token can be exchanged"):
        await asyncio.to_thread(exchange, exchanged.secret)
    refused = await _code(
        platform.identity.ExchangeToken(
            gateway_pb2.ExchangeTokenRequest(),
            metadata=(("authorization", f"Bearer {exchanged.secret}"),),
        )
    )
    assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.skipif(not DataPlane.available()[0], reason=DataPlane.available()[1])
async def test_a_key_revoked_at_the_gateway_is_refused_by_haproxy_within_a_second(
    platform: Platform, tmp_path: Path
) -> None:
    team = await _team(platform)
    key = await platform.member_with_key(team, f"ann-{team}", gateway_pb2.ROLE_VIEWER)

    # A stand-in for Triton's REST port: whatever the proxy lets through is answered 200.
    async def answer(_: web.Request) -> web.Response:
        return web.json_response({"outputs": []})

    triton = web.Application()
    triton.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(triton)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    triton_http = f"127.0.0.1:{runner.addresses[0][1]}"
    plane = DataPlane(workdir=tmp_path / "dataplane", triton_grpc=NOWHERE, triton_http=triton_http)
    await plane.start()
    source = GatewayKeys(platform.target, tokens=TEST_TOKENS)
    access = {"churn": DeploymentAccess(team=team), "secret": DeploymentAccess(team="research")}
    feed = GrantFeed(source=source, sink=plane, access=lambda: access)
    try:
        await plane.apply_routes(
            [
                RouteSpec(deployment=name, backends=(Backend(f"{name}__v1", "1", 100),))
                for name in access
            ]
        )
        await feed.start()
        # Each answer comes in milliseconds: a stalled one fails here, not at the suite's limit.
        async with aiohttp.ClientSession(
            f"http://{plane.http_address}", timeout=aiohttp.ClientTimeout(total=20)
        ) as http:

            async def status(deployment: str) -> int:
                async with http.post(
                    f"/v2/models/{deployment}/infer",
                    json={"inputs": []},
                    headers={"authorization": f"Bearer {key}"},
                ) as answer:
                    return answer.status

            assert await status("churn") == 200  # let through
            assert await status("secret") == 404  # another team's deployment
            await platform.identity.RevokeApiKey(
                gateway_pb2.RevokeApiKeyRequest(id=parse_key(key)[0]), metadata=platform.admin
            )
            revoked_at = time.monotonic()

            async def refused() -> bool:
                return await status("secret") == 401

            await eventually(refused, timeout=2.0, interval=0.005)
            took = time.monotonic() - revoked_at
            print(f"revoked at the gateway -> refused by HAProxy after {took * 1000:.0f} ms")
            assert took < 1.0
            assert await status("churn") == 401
    finally:
        await feed.stop()
        await source.close()
        await plane.stop()
        await runner.cleanup()
