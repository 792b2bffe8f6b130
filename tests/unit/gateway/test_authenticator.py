"""Credential -> caller against the real gateway store (SQLite): API keys valid, unknown,
wrong, revoked, expired; the one-second decision cache and its invalidation; last use written
at most once a minute, off the request path; the same message for unknown ids and wrong
secrets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from plinth_common.auth import Principal, PrincipalKind, Role
from plinth_common.db import Database
from plinth_common.errors import Unauthenticated
from plinth_common.events import Outbox
from services.gateway.app import MIGRATIONS
from services.gateway.auth import Authenticator
from services.gateway.identity import ApiKeyRecord, Identities
from services.gateway.store import SqlIdentityStore, outbox_table

ROOT = Principal("root", admin=True, via="test")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(SqlIdentityStore):
    """The real store, counting key reads (to see the cache at work)."""

    reads = 0

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        self.reads += 1
        return await super().get_key(key_id)


@dataclass
class Bench:
    store: CountingStore
    identities: Identities
    auth: Authenticator
    clock: Clock


@pytest_asyncio.fixture
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    await db.migrate(MIGRATIONS)
    store = CountingStore(db, Outbox(outbox_table, source="/plinth/gateway"))
    clock = Clock()
    auth = Authenticator(store, ttl_s=1.0, clock=clock)
    identities = Identities(store, on_change=auth.invalidate)
    await identities.create_team(ROOT, "vision", "")
    yield Bench(store, identities, auth, clock)
    await auth.stop()
    await db.close()


async def _key_for(bench: Bench, owner: str, **options: object) -> str:
    created = await bench.identities.create_key(ROOT, name="k", owner=owner, **options)  # type: ignore[arg-type]
    return created.token


async def test_a_key_proves_its_owner_with_their_memberships(bench: Bench) -> None:
    await bench.identities.add_member(ROOT, "vision", "ann", Role.DEVELOPER)
    token = await _key_for(bench, "ann")
    got = await bench.auth.authenticate(f"Bearer {token}")
    assert got.principal == Principal(
        "ann", PrincipalKind.USER, {"vision": Role.DEVELOPER}, False, "api_key"
    )
    assert got.key_id == token.split("_")[1]
    robot = await _key_for(bench, "ci", service_account=True)
    assert (
        await bench.auth.authenticate(f"bearer {robot}")
    ).principal.kind is PrincipalKind.SERVICE_ACCOUNT


async def test_unknown_ids_and_wrong_secrets_read_alike(bench: Bench) -> None:
    token = await _key_for(bench, "ann")
    key_id = token.split("_")[1]
    wrong_secret = f"plk_{key_id}_{'A' * 43}"
    unknown_id = f"plk_{'0' * 12}_{'A' * 43}"
    messages = set()
    for candidate in (wrong_secret, unknown_id):
        with pytest.raises(Unauthenticated) as caught:
            await bench.auth.authenticate(f"Bearer {candidate}")
        messages.add(caught.value.message)
        assert candidate not in caught.value.message and "A" * 43 not in caught.value.message
    assert messages == {"the API key is not valid"}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "no credential"),
        ("", "no credential"),
        ("Basic dXNlcjpwdw==", "must read 'Bearer <token>'"),
        ("Bearer", "must read 'Bearer <token>'"),
        ("Bearer plk_short", "the API key is malformed"),
        ("Bearer eyJhbGciOi.xyz.abc", "accepts no OIDC tokens"),
    ],
)
async def test_missing_and_malformed_credentials(
    bench: Bench, header: str | None, message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        await bench.auth.authenticate(header)


async def test_revocation_takes_effect_at_once_on_this_gateway(bench: Bench) -> None:
    token = await _key_for(bench, "ann")
    await bench.auth.authenticate(f"Bearer {token}")
    await bench.identities.revoke_key(ROOT, token.split("_")[1])
    with pytest.raises(Unauthenticated, match="has been revoked"):
        await bench.auth.authenticate(f"Bearer {token}")


async def test_another_replica_sees_a_revocation_within_the_cache_ttl(bench: Bench) -> None:
    token = await _key_for(bench, "ann")
    await bench.auth.authenticate(f"Bearer {token}")
    # Revoked through another gateway: this one's cache is not told.
    await bench.store.revoke_key(token.split("_")[1], datetime.now(UTC))
    await bench.auth.authenticate(f"Bearer {token}")  # the cached verdict, < 1 s old
    bench.clock.now += 1.01
    with pytest.raises(Unauthenticated, match="revoked"):
        await bench.auth.authenticate(f"Bearer {token}")


async def test_an_expired_key_is_refused(bench: Bench) -> None:
    token = await _key_for(bench, "ann", expires_at=datetime.now(UTC) + timedelta(seconds=30))
    await bench.auth.authenticate(f"Bearer {token}")
    later = Authenticator(bench.store, now=lambda: datetime.now(UTC) + timedelta(minutes=1))
    with pytest.raises(Unauthenticated, match="has expired"):
        await later.authenticate(f"Bearer {token}")


async def test_the_steady_state_is_a_cache_hit_and_failures_are_cached_too(bench: Bench) -> None:
    token = await _key_for(bench, "ann")
    bench.store.reads = 0
    for _ in range(100):
        await bench.auth.authenticate(f"Bearer {token}")
    assert bench.store.reads == 1
    bad = f"plk_{'1' * 12}_{'B' * 43}"
    for _ in range(100):
        with pytest.raises(Unauthenticated):
            await bench.auth.authenticate(f"Bearer {bad}")
    assert bench.store.reads == 2


async def test_a_membership_change_is_seen_at_once(bench: Bench) -> None:
    token = await _key_for(bench, "ann")
    assert (await bench.auth.authenticate(f"Bearer {token}")).principal.teams == {}
    await bench.identities.add_member(ROOT, "vision", "ann", Role.VIEWER)
    assert (await bench.auth.authenticate(f"Bearer {token}")).principal.teams == {
        "vision": Role.VIEWER
    }


async def test_last_use_is_written_at_most_once_a_minute(bench: Bench) -> None:
    token = await _key_for(bench, "ann")
    key_id = token.split("_")[1]
    await bench.auth.authenticate(f"Bearer {token}")
    await bench.auth.flush_usage()
    first = (await bench.store.get_key(key_id)).last_used_at  # type: ignore[union-attr]
    assert first is not None
    bench.clock.now += 30
    await bench.auth.authenticate(f"Bearer {token}")
    await bench.auth.flush_usage()
    assert (await bench.store.get_key(key_id)).last_used_at == first  # type: ignore[union-attr]
    bench.clock.now += 31
    await bench.auth.authenticate(f"Bearer {token}")
    await bench.auth.flush_usage()
    assert (await bench.store.get_key(key_id)).last_used_at > first  # type: ignore[union-attr,operator]


async def test_the_decision_cache_is_bounded(bench: Bench) -> None:
    small = Authenticator(bench.store, cache_size=10)
    for n in range(50):
        with pytest.raises(Unauthenticated):
            await small.authenticate(f"Bearer plk_{n:012x}_{'C' * 43}")
    assert len(small._cache) <= 10
