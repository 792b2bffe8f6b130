"""The data plane's key table on the real store (SQLite): ``Identities.key_digests`` answers
serving (and admins) with every usable key's salt, hash, owner and teams; its revision moves
with every key or membership change and with nothing else, so an unchanged poll is empty."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from plinth_common.auth import Principal, PrincipalKind, Role
from plinth_common.db import Database
from plinth_common.errors import PermissionDenied
from plinth_common.events import Outbox
from services.gateway.app import MIGRATIONS
from services.gateway.identity import Identities
from services.gateway.keys import hash_secret, parse_key
from services.gateway.store import SqlIdentityStore, outbox_table

ROOT = Principal("root", admin=True)
SERVING = Principal.service("serving")


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlIdentityStore]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    await db.migrate(MIGRATIONS)
    yield SqlIdentityStore(db, Outbox(outbox_table, source="/plinth/gateway"))
    await db.close()


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest_asyncio.fixture
async def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture
async def identities(store: SqlIdentityStore, clock: Clock) -> Identities:
    service = Identities(store, clock=clock)
    for team in ("vision", "nlp"):
        await service.create_team(ROOT, team, "")
    await service.add_member(ROOT, "vision", "ann", Role.DEVELOPER)
    await service.add_member(ROOT, "nlp", "ann", Role.VIEWER)
    return service


async def test_serving_gets_every_usable_key_with_its_owners_teams(
    identities: Identities, clock: Clock
) -> None:
    ann = await identities.create_key(ROOT, name="laptop", owner="ann")
    bot = await identities.create_key(ROOT, name="ci", owner="robot", service_account=True)
    boss = await identities.create_key(ROOT, name="ops", owner="root", admin=True)
    revoked = await identities.create_key(ROOT, name="old", owner="ann")
    await identities.revoke_key(ROOT, revoked.record.id)
    soon = await identities.create_key(
        ROOT, name="soon", owner="ann", expires_at=clock.now + timedelta(hours=1)
    )
    clock.now += timedelta(hours=2)  # "soon" has expired by the time serving asks

    answer = await identities.key_digests(SERVING, 0)

    assert answer.changed
    by_id = {d.key.id: d for d in answer.keys}
    assert set(by_id) == {ann.record.id, bot.record.id, boss.record.id}
    assert soon.record.id not in by_id and revoked.record.id not in by_id
    assert [d.key.id for d in answer.keys] == sorted(by_id)
    digest = by_id[ann.record.id]
    assert digest.key.owner == "ann" and not digest.key.admin
    assert dict(digest.teams) == {"vision": Role.DEVELOPER, "nlp": Role.VIEWER}
    # What a proxy checks: sha256("<salt>:<secret>") of the token's secret equals the hash.
    key_id, secret = parse_key(ann.token)
    assert key_id == digest.key.id
    assert hash_secret(digest.key.salt, secret) == digest.key.hash
    assert by_id[bot.record.id].key.kind is PrincipalKind.SERVICE_ACCOUNT
    assert dict(by_id[bot.record.id].teams) == {}
    assert by_id[boss.record.id].key.admin


async def test_an_unchanged_revision_answers_nothing(identities: Identities) -> None:
    await identities.create_key(ROOT, name="laptop", owner="ann")
    first = await identities.key_digests(SERVING, 0)
    again = await identities.key_digests(SERVING, first.revision)
    assert again.revision == first.revision and not again.changed and list(again.keys) == []
    # Any other revision (a poller from before the store was replaced) gets the whole table.
    other = await identities.key_digests(SERVING, first.revision + 1)
    assert other.changed and len(other.keys) == 1


async def test_the_revision_moves_with_keys_and_memberships_only(
    identities: Identities, store: SqlIdentityStore
) -> None:
    revisions = [(await identities.key_digests(SERVING, 0)).revision]

    async def moved() -> bool:
        revision = (await identities.key_digests(SERVING, revisions[-1])).revision
        changed = revision != revisions[-1]
        revisions.append(revision)
        return changed

    created = await identities.create_key(ROOT, name="laptop", owner="ann")
    assert await moved(), "a new key"
    await identities.revoke_key(ROOT, created.record.id)
    assert await moved(), "a revoked key"
    await identities.revoke_key(ROOT, created.record.id)
    assert not await moved(), "revoking a revoked key changes nothing"
    await identities.add_member(ROOT, "nlp", "bob", Role.VIEWER)
    assert await moved(), "a new member"
    await identities.add_member(ROOT, "nlp", "bob", Role.MAINTAINER)
    assert await moved(), "a changed role"
    await identities.remove_member(ROOT, "nlp", "bob")
    assert await moved(), "a removed member"
    await store.touch_keys({created.record.id: datetime.now(UTC)})
    await identities.create_team(ROOT, "robotics", "")
    await identities.list_keys(ROOT, owner="ann")
    assert not await moved(), "a key's use, a new empty team and reads change nothing"
    assert revisions == sorted(revisions)


async def test_the_revision_is_seeded_from_the_clock(identities: Identities) -> None:
    # A fresh store does not start at 1: a poller that outlived a replaced database never
    # finds its old revision current by coincidence.
    revision = (await identities.key_digests(SERVING, 0)).revision
    assert revision > (time.time() - 3600) * 1e6


@pytest.mark.parametrize(
    "caller",
    [
        Principal.service("scheduler"),
        Principal("ann", teams={"vision": Role.MAINTAINER}),
        Principal("robot", PrincipalKind.SERVICE_ACCOUNT, teams={"vision": Role.MAINTAINER}),
    ],
    ids=["another service", "a maintainer", "a service account"],
)
async def test_only_serving_and_admins_read_the_table(
    identities: Identities, caller: Principal
) -> None:
    with pytest.raises(PermissionDenied, match=r"keys\.digests needs admin"):
        await identities.key_digests(caller, 0)
    assert (await identities.key_digests(ROOT, 0)).changed


# --------------------------------------------------------------------------- long polls


async def test_a_waiting_poll_answers_as_soon_as_a_key_is_made_here(
    store: SqlIdentityStore, clock: Clock
) -> None:
    # A re-check far away: an answer within the wait comes from the change waking it.
    identities = Identities(store, clock=clock, recheck_s=30)
    current = (await identities.key_digests(SERVING, 0)).revision
    waiting = asyncio.create_task(identities.key_digests(SERVING, current, wait_s=20))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    created = await identities.create_key(ROOT, name="laptop", owner="ann")
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.changed and created.record.id in {d.key.id for d in answer.keys}
    waiting = asyncio.create_task(identities.key_digests(SERVING, answer.revision, wait_s=20))
    await asyncio.sleep(0.1)
    await identities.revoke_key(ROOT, created.record.id)
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.changed and created.record.id not in {d.key.id for d in answer.keys}


async def test_a_waiting_poll_sees_another_replicas_change_at_its_recheck(
    store: SqlIdentityStore, clock: Clock
) -> None:
    here = Identities(store, clock=clock, recheck_s=0.05)
    elsewhere = Identities(store, clock=clock)  # another gateway replica on the same store
    await elsewhere.create_team(ROOT, "vision", "")
    current = (await here.key_digests(SERVING, 0)).revision
    waiting = asyncio.create_task(here.key_digests(SERVING, current, wait_s=5))
    await asyncio.sleep(0.1)
    await elsewhere.add_member(ROOT, "vision", "ann", Role.VIEWER)
    answer = await asyncio.wait_for(waiting, 3)
    assert answer.changed and answer.revision != current


async def test_an_unchanged_wait_ends_unchanged_and_close_ends_it_early(
    identities: Identities,
) -> None:
    current = (await identities.key_digests(SERVING, 0)).revision
    started = time.monotonic()
    answer = await identities.key_digests(SERVING, current, wait_s=0.3)
    assert 0.3 <= time.monotonic() - started < 3 and not answer.changed

    waiting = asyncio.create_task(identities.key_digests(SERVING, current, wait_s=30))
    await asyncio.sleep(0.05)
    identities.close()  # the gateway stops: it must not wait for the poll's end
    answer = await asyncio.wait_for(waiting, 3)
    assert not answer.changed and answer.revision == current
