"""The gateway's store on PostgreSQL: teams, members, keys, revocation and the audit log with
its events, and the data plane's key table with its revision, through the real gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common.auth import Principal
from plinth_common.nats_server import NatsServer
from services.gateway.app import GatewayApp, GatewaySettings
from services.gateway.store import outbox_table
from tests.helpers import TEST_TOKENS, eventually, service_env

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


def _bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


async def test_gateway_keeps_identities_and_audit_on_postgres(
    tmp_path: Path, nats_server: NatsServer, postgres_database: str
) -> None:
    env = service_env(
        tmp_path,
        nats_server.url,
        PLINTH_GATEWAY_DATABASE_URL=postgres_database,
        PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE=str(tmp_path / "admin.key"),
    )
    app = GatewayApp(GatewaySettings.from_env(env))
    await app.start()
    try:
        admin = _bearer(app.admin_key)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            identity = gateway_pb2_grpc.IdentityServiceStub(channel)
            await identity.CreateTeam(gateway_pb2.CreateTeamRequest(name="pg"), metadata=admin)
            await identity.AddMember(
                gateway_pb2.AddMemberRequest(team="pg", user="ann", role=gateway_pb2.ROLE_VIEWER),
                metadata=admin,
            )
            key = await identity.CreateApiKey(
                gateway_pb2.CreateApiKeyRequest(name="k", owner="ann"), metadata=admin
            )
            ann = _bearer(key.secret)
            me = await identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=ann)
            assert [(t.team, t.role) for t in me.teams] == [("pg", gateway_pb2.ROLE_VIEWER)]
            members = await identity.ListMembers(
                gateway_pb2.ListMembersRequest(team="pg"), metadata=ann
            )
            assert [m.user for m in members.members] == ["ann"]
            await identity.RevokeApiKey(
                gateway_pb2.RevokeApiKeyRequest(id=key.key.id), metadata=ann
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await identity.WhoAmI(gateway_pb2.WhoAmIRequest(), metadata=ann)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

            async def audited() -> list[str]:
                page = await identity.ListAuditRecords(
                    gateway_pb2.ListAuditRecordsRequest(team="pg"), metadata=admin
                )
                return [r.method.rsplit("/", 1)[1] for r in page.records]

            methods = await eventually(audited, timeout=10)
            assert {"CreateTeam", "AddMember"} <= set(methods)

        async def published() -> bool:
            async with app.runtime.db.read() as session:
                waiting = await session.scalar(
                    sa.select(sa.func.count())
                    .select_from(outbox_table)
                    .where(outbox_table.c.published_at.is_(None))
                )
            return waiting == 0

        await eventually(published, timeout=10)
    finally:
        await app.stop()


async def test_the_data_planes_key_table_on_postgres(
    tmp_path: Path, nats_server: NatsServer, postgres_database: str
) -> None:
    env = service_env(
        tmp_path,
        nats_server.url,
        PLINTH_GATEWAY_DATABASE_URL=postgres_database,
        PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE=str(tmp_path / "admin.key"),
    )
    app = GatewayApp(GatewaySettings.from_env(env))
    await app.start()
    serving = (TEST_TOKENS.metadata(Principal.service("serving")),)
    try:
        admin = _bearer(app.admin_key)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            identity = gateway_pb2_grpc.IdentityServiceStub(channel)
            first = await identity.ListKeyDigests(
                gateway_pb2.ListKeyDigestsRequest(), metadata=serving
            )
            assert first.changed and len(first.keys) == 1  # the bootstrap admin key
            await identity.CreateTeam(gateway_pb2.CreateTeamRequest(name="pg"), metadata=admin)
            await identity.AddMember(
                gateway_pb2.AddMemberRequest(team="pg", user="ann", role=gateway_pb2.ROLE_VIEWER),
                metadata=admin,
            )
            key = await identity.CreateApiKey(
                gateway_pb2.CreateApiKeyRequest(name="k", owner="ann"), metadata=admin
            )
            # A poll waiting on the old revision answers with the new key.
            table = await identity.ListKeyDigests(
                gateway_pb2.ListKeyDigestsRequest(since_revision=first.revision, wait_ms=5000),
                metadata=serving,
            )
            assert table.revision > first.revision
            ann = next(k for k in table.keys if k.id == key.key.id)
            assert [(t.team, t.role) for t in ann.teams] == [("pg", gateway_pb2.ROLE_VIEWER)]
            unchanged = await identity.ListKeyDigests(
                gateway_pb2.ListKeyDigestsRequest(since_revision=table.revision), metadata=serving
            )
            assert not unchanged.changed and not unchanged.keys

            async def wait_for_change() -> gateway_pb2.ListKeyDigestsResponse:
                request = gateway_pb2.ListKeyDigestsRequest(
                    since_revision=table.revision, wait_ms=10000
                )
                return await identity.ListKeyDigests(request, metadata=serving)

            waiting = asyncio.create_task(wait_for_change())
            await asyncio.sleep(0.2)
            await identity.RevokeApiKey(
                gateway_pb2.RevokeApiKeyRequest(id=key.key.id), metadata=admin
            )
            after = await asyncio.wait_for(waiting, 5)
            assert after.changed and key.key.id not in {k.id for k in after.keys}
    finally:
        await app.stop()
