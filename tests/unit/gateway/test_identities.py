"""IdentityService rules on the real store (SQLite): teams and members for admins, a team's
members for its members only (NOT_FOUND otherwise), keys of one's own for anyone and the rest
for admins, the audit log for admins, names checked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from plinth_common.auth import Principal, PrincipalKind, Role
from plinth_common.db import Database
from plinth_common.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from plinth_common.events import Outbox
from services.gateway.app import MIGRATIONS
from services.gateway.identity import AuditEntry, AuditQuery, Identities, check_user
from services.gateway.store import SqlIdentityStore, outbox_table

ROOT = Principal("root", admin=True)
ANN = Principal("ann", teams={"vision": Role.DEVELOPER})
BOB = Principal("bob", teams={"nlp": Role.MAINTAINER})


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlIdentityStore]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    await db.migrate(MIGRATIONS)
    yield SqlIdentityStore(db, Outbox(outbox_table, source="/plinth/gateway"))
    await db.close()


@pytest_asyncio.fixture
async def identities(store: SqlIdentityStore) -> Identities:
    service = Identities(store)
    for team in ("vision", "nlp"):
        await service.create_team(ROOT, team, f"the {team} team")
    await service.add_member(ROOT, "vision", "ann", Role.DEVELOPER)
    await service.add_member(ROOT, "nlp", "bob", Role.MAINTAINER)
    return service


async def test_teams_are_created_by_admins_only(identities: Identities) -> None:
    with pytest.raises(PermissionDenied, match=r"teams\.manage on x needs admin"):
        await identities.create_team(BOB, "x", "")
    with pytest.raises(AlreadyExists):
        await identities.create_team(ROOT, "vision", "")
    with pytest.raises(InvalidArgument, match="name: lower-case"):
        await identities.create_team(ROOT, "Vision Team", "")


async def test_each_caller_lists_their_own_teams(identities: Identities) -> None:
    assert [t.name for t in await identities.list_teams(ANN)] == ["vision"]
    assert [t.name for t in await identities.list_teams(ROOT)] == ["nlp", "vision"]
    (vision,) = await identities.list_teams(ANN)
    assert vision.member_count == 1 and vision.description == "the vision team"
    # A team held through an OIDC claim only is listed too.
    claimed = Principal("cy", teams={"vision": Role.VIEWER, "robotics": Role.VIEWER}, via="oidc")
    assert [t.name for t in await identities.list_teams(claimed)] == ["robotics", "vision"]


async def test_members_are_visible_to_the_team_only(identities: Identities) -> None:
    members = await identities.list_members(ANN, "vision")
    assert [(m.user, m.role, m.added_by) for m in members] == [("ann", Role.DEVELOPER, "root")]
    with pytest.raises(NotFound, match="team 'nlp' not found"):
        await identities.list_members(ANN, "nlp")
    with pytest.raises(NotFound):
        await identities.list_members(ROOT, "ghosts")


async def test_members_are_added_changed_and_removed_by_admins(identities: Identities) -> None:
    with pytest.raises(PermissionDenied):
        await identities.add_member(BOB, "nlp", "cy", Role.VIEWER)
    changed = await identities.add_member(ROOT, "vision", "ann", Role.MAINTAINER)
    assert changed.role is Role.MAINTAINER
    assert await identities._store.memberships("ann") == {"vision": Role.MAINTAINER}
    with pytest.raises(InvalidArgument, match="user"):
        await identities.add_member(ROOT, "vision", "ann smith", Role.VIEWER)
    with pytest.raises(NotFound):
        await identities.add_member(ROOT, "ghosts", "ann", Role.VIEWER)
    removed = await identities.remove_member(ROOT, "vision", "ann")
    assert removed.user == "ann"
    with pytest.raises(NotFound, match="member"):
        await identities.remove_member(ROOT, "vision", "ann")


async def test_anyone_makes_keys_of_their_own_only(identities: Identities) -> None:
    mine = await identities.create_key(ANN, name="laptop")
    assert mine.record.owner == "ann" and mine.record.kind is PrincipalKind.USER
    assert not mine.record.admin and mine.token.startswith("plk_")
    for options in ({"owner": "bob"}, {"service_account": True}, {"admin": True}):
        with pytest.raises(PermissionDenied):
            await identities.create_key(ANN, name="x", **options)  # type: ignore[arg-type]
    robot = await identities.create_key(ROOT, name="ci", owner="ci-bot", service_account=True)
    assert robot.record.kind is PrincipalKind.SERVICE_ACCOUNT and robot.record.created_by == "root"
    with pytest.raises(InvalidArgument, match="expires_at"):
        await identities.create_key(ANN, name="old", expires_at=datetime.now(UTC) - timedelta(1))
    with pytest.raises(InvalidArgument, match="name"):
        await identities.create_key(ANN, name="my key")


async def test_keys_are_listed_and_revoked_by_their_owner_or_an_admin(
    identities: Identities,
) -> None:
    mine = await identities.create_key(ANN, name="laptop")
    await identities.create_key(BOB, name="desk")
    assert [k.name for k in await identities.list_keys(ANN)] == ["laptop"]
    with pytest.raises(PermissionDenied):
        await identities.list_keys(ANN, owner="bob")
    assert [k.name for k in await identities.list_keys(ROOT, owner="bob")] == ["desk"]
    # Another's key: NOT_FOUND, as for a key that does not exist.
    with pytest.raises(NotFound):
        await identities.revoke_key(BOB, mine.record.id)
    revoked = await identities.revoke_key(ANN, mine.record.id)
    assert revoked.revoked_at is not None
    assert await identities.list_keys(ANN) == []
    assert [k.id for k in await identities.list_keys(ANN, include_revoked=True)] == [mine.record.id]
    again = await identities.revoke_key(ROOT, mine.record.id)
    assert again.revoked_at == revoked.revoked_at  # the first revocation time stays


async def test_the_audit_log_is_admin_only_filtered_and_paged(
    identities: Identities, store: SqlIdentityStore
) -> None:
    base = datetime(2026, 6, 1, tzinfo=UTC)
    await store.add_audit(
        [
            AuditEntry(
                time=base + timedelta(minutes=n),
                principal="ann" if n % 2 else "bob",
                principal_kind="user",
                method="/m",
                permission="p",
                team="vision" if n % 2 else "nlp",
                resource=f"r{n}",
                outcome="OK" if n % 3 else "PERMISSION_DENIED",
                message="",
                trace_id="",
            )
            for n in range(10)
        ]
    )
    with pytest.raises(PermissionDenied, match=r"audit\.read needs admin"):
        await identities.list_audit(BOB, AuditQuery(), page_size=0, page_token="")
    page, token = await identities.list_audit(ROOT, AuditQuery(), page_size=4, page_token="")
    assert [r.resource for r in page] == ["r9", "r8", "r7", "r6"] and token
    rest, end = await identities.list_audit(ROOT, AuditQuery(), page_size=10, page_token=token)
    assert [r.resource for r in rest] == ["r5", "r4", "r3", "r2", "r1", "r0"] and end == ""
    ann, _ = await identities.list_audit(
        ROOT, AuditQuery(principal="ann", team="vision"), page_size=0, page_token=""
    )
    assert {r.principal for r in ann} == {"ann"} and len(ann) == 5
    denied, _ = await identities.list_audit(
        ROOT, AuditQuery(denials_only=True), page_size=0, page_token=""
    )
    assert [r.resource for r in denied] == ["r9", "r6", "r3", "r0"]
    window, _ = await identities.list_audit(
        ROOT,
        AuditQuery(since=base + timedelta(minutes=2), until=base + timedelta(minutes=4)),
        page_size=0,
        page_token="",
    )
    assert [r.resource for r in window] == ["r3", "r2"]


def test_user_names() -> None:
    for good in ("ann", "ann.smith@example.com", "ci-bot", "A1"):
        assert check_user(good) == good
    for bad in ("", "-ann", "ann smith", "a/b", "x" * 129):
        with pytest.raises(InvalidArgument):
            check_user(bad)
