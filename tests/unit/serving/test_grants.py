"""The grant feed with a fake gateway and a fake data plane: what the proxy is given, when, and
that a revoked key, a new share or a deleted deployment reaches it within a second; grants
equal to the Python path's own rule (``may(inference.call)``) on random tables."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping, Sequence

import pytest

from plinth_common.auth import PrincipalKind, Role, may
from plinth_common.auth.permissions import INFERENCE_CALL
from plinth_common.errors import Unavailable
from services.serving.dataplane import KeyGrant
from services.serving.domain import DeploymentAccess
from services.serving.grants import GatewayKey, GrantFeed, KeyTable, grants_for
from tests.helpers import eventually

NOW = 1_800_000_000.0


def key(key_id: str, owner: str = "", *, admin: bool = False, **teams: Role) -> GatewayKey:
    return GatewayKey(
        id=key_id,
        salt=f"salt-{key_id}",
        hash=f"hash-{key_id}",
        owner=owner or f"user-{key_id}",
        admin=admin,
        teams=teams,
    )


class FakeGateway:
    """ListKeyDigests from a list: a new revision on every change, which wakes a waiting call;
    ``down`` fails every call."""

    def __init__(self, *keys: GatewayKey) -> None:
        self.keys = list(keys)
        self.revision = 100
        self.down = False
        self.calls = 0
        self._changed = asyncio.Event()

    def change(self, *keys: GatewayKey) -> None:
        self.keys = list(keys)
        self.revision += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def key_digests(self, since_revision: int, wait_s: float = 0.0) -> KeyTable | None:
        self.calls += 1
        if self.down:
            raise Unavailable("the gateway service cannot be reached; retry shortly")
        if since_revision == self.revision and wait_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait_s)
        if since_revision == self.revision:
            return None
        return KeyTable(self.revision, tuple(self.keys))


class FakeDataPlane:
    """Keeps every grant set it was given; ``failures`` makes that many updates raise."""

    def __init__(self) -> None:
        self.applied: list[dict[str, KeyGrant]] = []
        self.failures = 0
        self.changed = asyncio.Event()

    async def apply_grants(self, grants: Sequence[KeyGrant]) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("haproxy runtime API: connection refused")
        self.applied.append({g.key_id: g for g in grants})
        self.changed.set()

    @property
    def current(self) -> dict[str, KeyGrant]:
        assert self.applied, "no grants applied yet"
        return self.applied[-1]

    def allowed(self, key_id: str) -> set[str]:
        return set(self.current[key_id].deployments)


class Access:
    """Serving's access table, changed by the test."""

    def __init__(self, **rows: DeploymentAccess) -> None:
        self.rows = dict(rows)

    def __call__(self) -> Mapping[str, DeploymentAccess]:
        return dict(self.rows)


def table() -> Access:
    return Access(
        churn=DeploymentAccess(team="vision"),
        sentiment=DeploymentAccess(team="nlp", shared_with=frozenset({"vision"})),
        secret=DeploymentAccess(team="research"),
    )


def feed(gateway: FakeGateway, plane: FakeDataPlane, access: Access) -> GrantFeed:
    return GrantFeed(source=gateway, sink=plane, access=access, clock=lambda: NOW)


# --------------------------------------------------------------------------- what is granted


async def test_keys_get_their_teams_deployments_shares_included_admins_all() -> None:
    gateway = FakeGateway(
        key("ann1", "ann", vision=Role.VIEWER),
        key("bob1", "bob", nlp=Role.MAINTAINER),
        key("root", "root", admin=True),
        key("nobody", "cy"),
    )
    plane = FakeDataPlane()
    assert await feed(gateway, plane, table()).refresh()

    assert plane.allowed("ann1") == {"churn", "sentiment"}  # sentiment: shared with vision
    assert plane.allowed("bob1") == {"sentiment"}
    assert plane.allowed("root") == {"churn", "sentiment", "secret"}
    # Known but granted nothing: the proxy answers NOT_FOUND, not UNAUTHENTICATED.
    assert plane.allowed("nobody") == set()
    grant = plane.current["ann1"]
    assert (grant.salt, grant.hash, grant.principal, grant.expires_at) == (
        "salt-ann1",
        "hash-ann1",
        "ann",
        None,
    )


def test_grants_equal_the_python_paths_rule_on_random_tables() -> None:
    rng = random.Random(13)
    teams = [f"t{i}" for i in range(8)]
    for _ in range(50):
        access = {
            f"d{i}": DeploymentAccess(
                team=rng.choice(teams),
                shared_with=frozenset(rng.sample(teams, rng.randint(0, 3))),
            )
            for i in range(rng.randint(0, 12))
        }
        keys = [
            GatewayKey(
                id=f"k{i}",
                salt="s",
                hash="h",
                owner=f"u{i}",
                kind=rng.choice([PrincipalKind.USER, PrincipalKind.SERVICE_ACCOUNT]),
                admin=rng.random() < 0.1,
                teams={t: rng.choice(list(Role)) for t in rng.sample(teams, rng.randint(0, 3))},
                expires_at=rng.choice([None, NOW - 1, NOW + 60]),
            )
            for i in range(20)
        ]
        fast = {g.key_id: g.deployments for g in grants_for(keys, access, NOW)}
        by_rule = {
            k.id: frozenset(
                name
                for name, row in access.items()
                if may(k.principal(), INFERENCE_CALL, row.team, shared_with=row.shared_with)
            )
            for k in keys
            if k.expires_at is None or k.expires_at > NOW
        }
        assert fast == by_rule


# --------------------------------------------------------------------------- when it is pushed


async def test_an_unchanged_gateway_and_table_push_nothing_again() -> None:
    gateway = FakeGateway(key("ann1", "ann", vision=Role.VIEWER))
    plane = FakeDataPlane()
    grants = feed(gateway, plane, table())
    assert await grants.refresh()
    for _ in range(5):
        assert not await grants.refresh()
    assert len(plane.applied) == 1 and gateway.calls == 6
    assert grants.revision == gateway.revision
    # A new revision whose keys are the same (a membership of somebody without keys) neither.
    gateway.change(*gateway.keys)
    assert not await grants.refresh()
    assert len(plane.applied) == 1


async def test_nothing_is_pushed_before_the_gateway_first_answers() -> None:
    gateway = FakeGateway(key("ann1", "ann", vision=Role.VIEWER))
    gateway.down = True
    plane = FakeDataPlane()
    grants = feed(gateway, plane, table())
    assert not await grants.refresh()
    assert plane.applied == [] and grants.source_down_since == NOW
    gateway.down = False
    assert await grants.refresh()
    assert plane.allowed("ann1") == {"churn", "sentiment"}
    assert grants.source_down_since is None


async def test_a_revoked_key_and_a_changed_membership_reach_the_data_plane() -> None:
    ann = key("ann1", "ann", vision=Role.VIEWER)
    bob = key("bob1", "bob", nlp=Role.VIEWER)
    gateway, plane = FakeGateway(ann, bob), FakeDataPlane()
    grants = feed(gateway, plane, table())
    await grants.refresh()

    gateway.change(bob)  # ann's key revoked
    assert await grants.refresh()
    assert set(plane.current) == {"bob1"}

    gateway.change(key("bob1", "bob", research=Role.VIEWER))  # bob moved teams
    assert await grants.refresh()
    assert plane.allowed("bob1") == {"secret"}


async def test_deployments_created_shared_and_deleted_reach_the_data_plane() -> None:
    gateway, plane, access = (
        FakeGateway(key("bob1", "bob", nlp=Role.VIEWER)),
        FakeDataPlane(),
        table(),
    )
    grants = feed(gateway, plane, access)
    await grants.refresh()
    assert plane.allowed("bob1") == {"sentiment"}

    access.rows["fraud"] = DeploymentAccess(team="nlp")
    assert await grants.refresh()
    assert plane.allowed("bob1") == {"sentiment", "fraud"}

    access.rows["secret"] = DeploymentAccess(team="research", shared_with=frozenset({"nlp"}))
    assert await grants.refresh()
    assert plane.allowed("bob1") == {"sentiment", "fraud", "secret"}

    del access.rows["sentiment"]
    assert await grants.refresh()
    assert plane.allowed("bob1") == {"fraud", "secret"}


async def test_an_expired_key_is_dropped_without_the_gateway_changing() -> None:
    now = [NOW]
    soon = GatewayKey(
        id="soon",
        salt="s",
        hash="h",
        owner="ann",
        teams={"vision": Role.VIEWER},
        expires_at=NOW + 5,
    )
    gateway, plane = FakeGateway(soon, key("ann1", "ann", vision=Role.VIEWER)), FakeDataPlane()
    grants = GrantFeed(source=gateway, sink=plane, access=table(), clock=lambda: now[0])
    await grants.refresh()
    assert plane.current["soon"].expires_at == NOW + 5

    now[0] = NOW + 4.9
    assert not await grants.refresh()
    now[0] = NOW + 5
    assert await grants.refresh()
    assert set(plane.current) == {"ann1"}
    assert len(plane.applied) == 2


async def test_while_the_gateway_is_down_the_last_keys_stand_and_deployments_still_move(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway, plane, access = (
        FakeGateway(key("ann1", "ann", vision=Role.VIEWER)),
        FakeDataPlane(),
        table(),
    )
    grants = feed(gateway, plane, access)
    await grants.refresh()
    gateway.down = True
    with caplog.at_level(logging.WARNING, logger="services.serving.grants"):
        for _ in range(10):
            await grants.refresh()
        del access.rows["churn"]
        assert await grants.refresh()
    assert plane.allowed("ann1") == {"sentiment"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one line while it stays down, not one per poll"
    assert "keeps the last keys it was given" in warnings[0].getMessage()

    gateway.down = False
    gateway.change()  # every key revoked meanwhile
    assert await grants.refresh()
    assert plane.current == {}


async def test_a_failed_update_of_the_data_plane_is_retried() -> None:
    gateway, plane = FakeGateway(key("ann1", "ann", vision=Role.VIEWER)), FakeDataPlane()
    plane.failures = 2
    grants = feed(gateway, plane, table())
    assert not await grants.refresh()
    assert not await grants.refresh()
    assert grants.applied is None
    assert await grants.refresh()
    assert plane.allowed("ann1") == {"churn", "sentiment"}
    assert grants.applied is not None and len(grants.applied) == 1


# --------------------------------------------------------------------------- in real time


async def test_revocation_reaches_the_data_plane_at_once_and_an_idle_feed_asks_rarely() -> None:
    gateway, plane = FakeGateway(key("ann1", "ann", vision=Role.VIEWER)), FakeDataPlane()
    grants = GrantFeed(source=gateway, sink=plane, access=table(), interval_s=0.05, wait_s=10)
    await grants.start()
    try:
        assert "ann1" in plane.current
        await asyncio.sleep(0.5)
        # Idle: one waiting call after the first pass, not one per interval.
        assert gateway.calls == 2
        plane.changed.clear()
        revoked_at = time.monotonic()
        gateway.change()
        await asyncio.wait_for(plane.changed.wait(), 1.0)
        took = time.monotonic() - revoked_at
        assert plane.current == {}
        assert took < 1.0, f"revocation took {took:.3f}s"
    finally:
        await grants.stop()


async def test_a_gateway_down_while_following_is_asked_again_and_catches_up() -> None:
    gateway, plane = FakeGateway(key("ann1", "ann", vision=Role.VIEWER)), FakeDataPlane()
    grants = GrantFeed(source=gateway, sink=plane, access=table(), interval_s=0.05, wait_s=0.1)
    await grants.start()
    try:
        gateway.down = True

        async def noticed() -> bool:
            return grants.source_down_since is not None

        await eventually(noticed, timeout=2.0, interval=0.01)
        gateway.keys = []  # revoked while it was unreachable
        gateway.revision += 1
        plane.changed.clear()
        gateway.down = False
        await asyncio.wait_for(plane.changed.wait(), 1.0)
        assert plane.current == {} and grants.source_down_since is None
    finally:
        await grants.stop()


async def test_notify_pushes_a_deployment_change_without_waiting_for_the_interval() -> None:
    gateway, plane, access = (
        FakeGateway(key("bob1", "bob", nlp=Role.VIEWER)),
        FakeDataPlane(),
        table(),
    )
    grants = GrantFeed(source=gateway, sink=plane, access=access, interval_s=30)
    await grants.start()
    try:
        plane.changed.clear()
        access.rows["fraud"] = DeploymentAccess(team="nlp")
        grants.notify()
        await asyncio.wait_for(plane.changed.wait(), 1.0)
        assert plane.allowed("bob1") == {"sentiment", "fraud"}
    finally:
        await grants.stop()
