"""Who may read, push to and materialize which feature views, and who may apply a repository.

Views belong to the team their ``team`` tag names: ``rides`` and ``rides_fresh`` (fed by the push
source ``rides_push``) are team ``mobility``'s, ``fraud_scores`` is team ``risk``'s, ``legacy`` has
no tag (admins only), and the on-demand ``ride_risk`` of ``mobility`` reads ``fraud_scores``.
"""

from __future__ import annotations

import pytest

from plinth_common.auth import Principal, Role
from plinth_common.errors import FailedPrecondition, NotFound, PermissionDenied
from services.features.domain import FeatureViewInfo, Ownership, TableFormat
from tests.helpers import ADMIN, member
from tests.unit.features.fakes import END, START, FakeEngine, service_on

pytestmark = pytest.mark.asyncio(loop_scope="session")

OWNERS = Ownership(
    view_teams={
        "rides": "mobility",
        "rides_fresh": "mobility",
        "fraud_scores": "risk",
        "legacy": "",
        "ride_risk": "mobility",
    },
    view_sources={"ride_risk": ("fraud_scores",)},
    push_views={"rides_push": ("rides_fresh",), "fraud_push": ("fraud_scores",)},
    materializable=("fraud_scores", "legacy", "rides", "rides_fresh"),
)
VIEWER = member("vi", mobility=Role.VIEWER)
DEVELOPER = member("dev", mobility=Role.DEVELOPER)
MAINTAINER = member("mae", mobility=Role.MAINTAINER)
OUTSIDER = member("otto", risk=Role.MAINTAINER)
SERVING = Principal.service("serving")  # reads any team's features to serve them


def engine() -> FakeEngine:
    fake = FakeEngine(views=tuple(OWNERS.view_teams), owners=OWNERS)
    fake.listed = [_view(name, team) for name, team in OWNERS.view_teams.items()]
    return fake


def _view(name: str, team: str) -> FeatureViewInfo:
    return FeatureViewInfo(
        name=name,
        entities=("ride",),
        features=("f",),
        join_keys=("ride_id",),
        ttl_seconds=0.0,
        online=True,
        batch_source="",
        push_source="",
        tags={"team": team} if team else {},
    )


READ, WRITE = "read", "write"


@pytest.mark.parametrize(
    ("caller", "reads", "writes"),
    [
        (VIEWER, None, PermissionDenied),
        (DEVELOPER, None, None),
        (MAINTAINER, None, None),
        (OUTSIDER, NotFound, NotFound),
        (ADMIN, None, None),
    ],
    ids=["viewer", "developer", "maintainer", "non-member", "admin"],
)
async def test_each_role_on_the_views_of_its_team(
    caller: Principal, reads: type[Exception] | None, writes: type[Exception] | None
) -> None:
    service, _ = service_on(engine())

    async def outcome(call: object) -> type[Exception] | None:
        try:
            await call  # type: ignore[misc]
        except (NotFound, PermissionDenied) as exc:
            return type(exc)
        return None

    assert (
        await outcome(service.get_online_features(caller, ["rides:f"], [{"ride_id": 1}])) == reads
    )
    assert (
        await outcome(
            service.get_historical_features(
                caller, ["rides:f"], b"PAR1", TableFormat.PARQUET, full_feature_names=False
            )
        )
        == reads
    )
    assert await outcome(
        service.push(caller, "rides_push", [{"ride_id": 1}], to_offline=False)
    ) == (writes)
    assert await outcome(service.materialize(caller, ["rides"], START, END)) == writes
    assert await outcome(service.materialize_incremental(caller, ["rides"], END)) == writes


async def test_another_teams_view_answers_exactly_as_a_missing_one() -> None:
    service, _ = service_on(engine())
    for refs in (["fraud_scores:f"], ["rides:f", "fraud_scores:f"], ["legacy:f"]):
        with pytest.raises(NotFound) as theirs:
            await service.get_online_features(DEVELOPER, refs, [{"ride_id": 1}])
        assert str(theirs.value) == f"feature view {refs[-1].split(':')[0]!r} not found"
    with pytest.raises(NotFound) as missing:
        await service.get_online_features(DEVELOPER, ["nothing:f"], [{"ride_id": 1}])
    assert str(missing.value) == "feature view 'nothing' not found"
    with pytest.raises(NotFound) as push:
        await service.push(DEVELOPER, "fraud_push", [{"id": 1}], to_offline=False)
    assert str(push.value) == "push source 'fraud_push' not found"


async def test_an_on_demand_view_needs_read_on_the_views_it_is_computed_from() -> None:
    service, _ = service_on(engine())
    with pytest.raises(NotFound) as caught:
        await service.get_online_features(DEVELOPER, ["ride_risk:f"], [{"ride_id": 1}])
    assert caught.value.name == "fraud_scores"
    both = member("bo", mobility=Role.VIEWER, risk=Role.VIEWER)
    await service.get_online_features(both, ["ride_risk:f"], [{"ride_id": 1}])


async def test_denials_name_the_permission_and_the_role() -> None:
    service, _ = service_on(engine())
    with pytest.raises(PermissionDenied) as caught:
        await service.push(VIEWER, "rides_push", [{"ride_id": 1}], to_offline=False)
    assert str(caught.value) == "features.push on rides_push needs developer"
    with pytest.raises(PermissionDenied) as caught:
        await service.materialize(VIEWER, ["rides"], START, END)
    assert str(caught.value) == "features.materialize on rides needs developer"


async def test_listing_shows_the_views_of_the_callers_teams() -> None:
    service, _ = service_on(engine())

    async def names(caller: Principal) -> set[str]:
        return {v.name for v in await service.list_feature_views(caller)}

    assert await names(VIEWER) == {"rides", "rides_fresh", "ride_risk"}
    assert await names(OUTSIDER) == {"fraud_scores"}
    assert await names(member("nobody")) == set()
    assert await names(ADMIN) == set(OWNERS.view_teams)
    assert await names(SERVING) == set(OWNERS.view_teams)


async def test_materializing_all_covers_the_callers_teams_only() -> None:
    fake = engine()
    service, events = service_on(fake)
    run = await service.materialize(DEVELOPER, [], START, END)
    assert fake.calls[-1] == ("materialize", ["rides", "rides_fresh"])
    assert run.feature_views == ("rides", "rides_fresh")
    assert events.teams == ["mobility"]
    with pytest.raises(PermissionDenied):
        await service.materialize(VIEWER, [], START, END)
    with pytest.raises(FailedPrecondition):
        await service.materialize(member("nobody"), [], START, END)


async def test_a_materialization_of_several_teams_emits_one_event_per_team() -> None:
    service, events = service_on(engine())
    await service.materialize(ADMIN, ["rides", "fraud_scores", "legacy"], START, END)
    runs = [r.feature_views for r in events.materialized_runs]
    assert sorted(zip(events.teams, runs, strict=True)) == [
        ("", ("legacy",)),
        ("mobility", ("rides",)),
        ("risk", ("fraud_scores",)),
    ]


@pytest.mark.parametrize("caller", [MAINTAINER, OUTSIDER, SERVING, member("nobody")])
async def test_only_admins_apply_a_repository_it_runs_python(caller: Principal) -> None:
    fake = engine()
    service, _ = service_on(fake)
    with pytest.raises(PermissionDenied) as caught:
        await service.apply_repository(caller, {"repo.py": b"import os; os.system('id')\n"})
    assert str(caught.value) == "features.apply needs admin"
    assert fake.calls == [], "nothing staged, nothing executed"


async def test_serving_reads_any_teams_features_but_pushes_none() -> None:
    service, _ = service_on(engine())
    await service.get_online_features(SERVING, ["fraud_scores:f", "legacy:f"], [{"id": 1}])
    with pytest.raises(NotFound):
        await service.push(SERVING, "rides_push", [{"ride_id": 1}], to_offline=False)
