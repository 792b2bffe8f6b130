"""The gateway's store on PostgreSQL: teams, members, keys, revocation and the audit log with
its events, through the real gateway."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common.nats_server import NatsServer
from services.gateway.app import GatewayApp, GatewaySettings
from services.gateway.store import outbox_table
from tests.helpers import eventually, service_env

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
