"""An OIDC token exchanged for an API key (``Identities.exchange_token`` on the real store,
SQLite): the key is the same user with the claim's teams, admin flag and at most the token's
lifetime; the gateway authenticates it with those teams and the data plane's key table lists
them, the gateway's own memberships read live beside them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from plinth_common.auth import Principal, Role
from plinth_common.db import Database
from plinth_common.errors import FailedPrecondition, InvalidArgument
from plinth_common.events import Outbox
from services.gateway.app import MIGRATIONS
from services.gateway.auth import Authenticator
from services.gateway.identity import Identities, TokenClaims
from services.gateway.store import SqlIdentityStore, outbox_table

ROOT = Principal("root", admin=True)
SERVING = Principal.service("serving")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
# What the gateway made of olga's token: her claim's teams merged with stored ones.
OLGA = Principal("olga", teams={"claimed": Role.DEVELOPER}, via="oidc")
CLAIMS = TokenClaims(
    teams={"claimed": Role.DEVELOPER, "vision": Role.VIEWER},
    admin=False,
    expires_at=NOW + timedelta(minutes=30),
)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlIdentityStore]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    await db.migrate(MIGRATIONS)
    yield SqlIdentityStore(db, Outbox(outbox_table, source="/plinth/gateway"))
    await db.close()


@pytest_asyncio.fixture
async def identities(store: SqlIdentityStore) -> Identities:
    service = Identities(store, clock=lambda: NOW)
    await service.create_team(ROOT, "vision", "")
    await service.add_member(ROOT, "vision", "olga", Role.MAINTAINER)
    return service


async def test_the_key_is_the_same_user_teams_and_lifetime(
    identities: Identities, store: SqlIdentityStore
) -> None:
    created = await identities.exchange_token(OLGA, CLAIMS)
    record = created.record
    assert (record.owner, record.name, record.admin) == ("olga", "oidc", False)
    assert record.expires_at == CLAIMS.expires_at
    assert created.token.startswith(f"plk_{record.id}_")

    # The data plane's table: the claim's teams, with the stored membership (higher) beside.
    (digest,) = (await identities.key_digests(SERVING, 0)).keys
    assert dict(digest.teams) == {"claimed": Role.DEVELOPER, "vision": Role.MAINTAINER}
    assert digest.key.expires_at == CLAIMS.expires_at

    # The gateway itself authenticates the key the same way.
    authenticator = Authenticator(store, now=lambda: NOW)
    me = (await authenticator.authenticate(f"Bearer {created.token}")).principal
    assert (me.name, me.via, me.admin) == ("olga", "api_key", False)
    assert me.teams == {"claimed": Role.DEVELOPER, "vision": Role.MAINTAINER}

    # A stored membership removed later is gone from the key at once; the claim's stay.
    await identities.remove_member(ROOT, "vision", "olga")
    (digest,) = (await identities.key_digests(SERVING, 0)).keys
    assert dict(digest.teams) == {"claimed": Role.DEVELOPER, "vision": Role.VIEWER}


async def test_the_lifetime_never_outlasts_the_token(identities: Identities) -> None:
    sooner = NOW + timedelta(minutes=5)
    assert (await identities.exchange_token(OLGA, CLAIMS, expires_at=sooner)).record.expires_at == (
        sooner
    )
    later = NOW + timedelta(days=30)
    capped = await identities.exchange_token(OLGA, CLAIMS, expires_at=later)
    assert capped.record.expires_at == CLAIMS.expires_at
    with pytest.raises(InvalidArgument, match="expires_at: must be in the future"):
        await identities.exchange_token(OLGA, CLAIMS, expires_at=NOW - timedelta(seconds=1))


async def test_an_admin_token_gives_an_admin_key(identities: Identities) -> None:
    boss = Principal("boss", admin=True, via="oidc")
    claims = TokenClaims(teams={}, admin=True, expires_at=NOW + timedelta(minutes=5))
    assert (await identities.exchange_token(boss, claims)).record.admin


async def test_only_an_oidc_token_is_exchanged(identities: Identities) -> None:
    with pytest.raises(FailedPrecondition, match="only an OIDC token can be exchanged"):
        await identities.exchange_token(Principal("olga", via="api_key"), None)
    with pytest.raises(InvalidArgument, match="name"):
        await identities.exchange_token(OLGA, CLAIMS, name="my laptop")
    # A user name from the identity provider that names no key owner (a space) is refused.
    with pytest.raises(InvalidArgument, match="owner"):
        await identities.exchange_token(Principal("Olga Smith", via="oidc"), CLAIMS)
