"""The registry service's access rules with fakes: approvals (legacy ``approved``, four-eyes),
a job's registration of another team's run, team MLflow users and their grants."""

from __future__ import annotations

import pytest

from plinth_common.auth import Principal, Role
from plinth_common.errors import FailedPrecondition, NotFound, PermissionDenied
from services.registry.cache import ReadCache
from services.registry.domain import FinishedJob, PromotionPolicy, TeamCredentials
from services.registry.service import RegistryService
from tests.helpers import ADMIN, member
from tests.unit.registry.fakes import FakeMlflow, FakeUsers, MemoryRecords, RecordedEvents

pytestmark = pytest.mark.asyncio(loop_scope="session")

RUN_A, RUN_B = "a" * 32, "b" * 32
ANN = member("ann", ml=Role.MAINTAINER)
BOB = member("bob", ml=Role.MAINTAINER)
DEV = member("dev", ml=Role.DEVELOPER)
SCHEDULER = Principal.service("scheduler")


@pytest.fixture
def parts() -> tuple[FakeMlflow, RecordedEvents, MemoryRecords, FakeUsers]:
    mlflow = FakeMlflow()
    mlflow.add_run(RUN_A, {"rmse": 50.0})
    mlflow.add_run(RUN_B, {"rmse": 51.0})
    records = MemoryRecords()
    return mlflow, RecordedEvents(records=records), records, FakeUsers()


@pytest.fixture
def service(parts: tuple[FakeMlflow, RecordedEvents, MemoryRecords, FakeUsers]) -> RegistryService:
    mlflow, events, records, users = parts
    return RegistryService(
        mlflow=mlflow,
        events=events,
        cache=ReadCache(ttl_s=60.0),
        facts=ReadCache(ttl_s=60.0),
        records=records,
        users=users,
    )


async def approval_policy(service: RegistryService, *, distinct: bool) -> None:
    await service.create_version(ADMIN, name="m", team="ml", run_id=RUN_A)
    await service.set_policy(
        ADMIN,
        name="m",
        policy=PromotionPolicy(require_approval=True, require_distinct_approver=distinct),
    )


async def test_a_maintainers_own_approved_flag_counts_and_is_recorded_a_developers_does_not(
    service: RegistryService,
) -> None:
    await approval_policy(service, distinct=False)
    with pytest.raises(FailedPrecondition, match="requires approval"):
        await service.set_alias(DEV, name="m", alias="staging", version="1", approved=True)
    promotion = await service.set_alias(ANN, name="m", alias="staging", version="1", approved=True)
    assert (promotion.promoted_by, promotion.approved_by) == ("ann", "ann")
    version = await service.get_version(DEV, "m", "1")
    assert [(a.alias, a.approved_by) for a in version.approvals] == [("staging", "ann")]
    assert [(h.promoted_by, h.approved_by) for h in version.history] == [("ann", "ann")]
    listed, _ = await service.list_versions(DEV, "m", page_size=10, page_token="")
    assert [(v.approvals, v.history) for v in listed] == [(version.approvals, version.history)]
    # The recorded approval now lets a developer move that alias to that version again.
    again = await service.set_alias(DEV, name="m", alias="staging", version="1")
    assert (again.promoted_by, again.approved_by) == ("dev", "ann")


async def test_four_eyes_needs_an_approval_by_someone_else_for_that_alias(
    service: RegistryService,
) -> None:
    await approval_policy(service, distinct=True)
    await service.approve(ANN, name="m", version="1", alias="staging")
    for approved in (False, True):
        with pytest.raises(FailedPrecondition, match="other than ann") as caught:
            await service.set_alias(ANN, name="m", alias="staging", version="1", approved=approved)
        assert caught.value.reason == "APPROVAL_REQUIRED"
    with pytest.raises(FailedPrecondition, match="requires approval"):  # approved for staging only
        await service.set_alias(BOB, name="m", alias="canary", version="1")
    promotion = await service.set_alias(BOB, name="m", alias="staging", version="1")
    assert (promotion.promoted_by, promotion.approved_by) == ("bob", "ann")


async def test_approving_needs_a_maintainer_of_the_models_team(service: RegistryService) -> None:
    await approval_policy(service, distinct=False)
    with pytest.raises(PermissionDenied, match=r"models\.approve on m needs maintainer"):
        await service.approve(DEV, name="m", version="1", alias="production")
    with pytest.raises(NotFound, match="registered model 'm'"):
        await service.approve(member("eve", nlp=Role.MAINTAINER), name="m", version="1", alias="x")
    with pytest.raises(NotFound, match="m/7"):
        await service.approve(ANN, name="m", version="7", alias="production")


async def test_a_job_cannot_register_another_teams_run(
    service: RegistryService, parts: tuple[FakeMlflow, RecordedEvents, MemoryRecords, FakeUsers]
) -> None:
    _, _, records, _ = parts
    await records.save_team_user(
        TeamCredentials(team="nlp", username="team-nlp", password="p", experiment_id="1")
    )
    job = FinishedJob(
        job_id="j-1",
        team="ml",
        succeeded=True,
        register_as="stolen",
        mlflow_run_id=RUN_A,
        model_uri=f"runs:/{RUN_A}/model",
    )
    with pytest.raises(PermissionDenied, match="belongs to team 'nlp'"):
        await service.register_finished_job(job)


async def test_team_credentials_are_made_once_with_grants_on_the_teams_experiment_and_models(
    service: RegistryService, parts: tuple[FakeMlflow, RecordedEvents, MemoryRecords, FakeUsers]
) -> None:
    _, _, _, users = parts
    users.experiments["ml"] = "1"  # the fake runs' experiment: made by a job before
    await service.create_version(ADMIN, name="older", team="ml", run_id=RUN_A)
    first = await service.team_credentials(SCHEDULER, "ml")
    assert first.username == "team-ml" and users.passwords["team-ml"] == first.password
    assert first.password not in repr(first)
    assert await service.team_credentials(SCHEDULER, "ml") == first
    await service.create_version(ADMIN, name="newer", team="ml", run_id=RUN_B)
    assert users.grants == {
        ("team-ml", "experiment", first.experiment_id),
        ("team-ml", "registered_model", "older"),
        ("team-ml", "registered_model", "newer"),
    }
    # Its runs are the team's now: another team's member does not see them.
    assert (await service.get_run(DEV, RUN_A)).run_id == RUN_A
    with pytest.raises(NotFound):
        await service.get_run(member("eve", nlp=Role.MAINTAINER), RUN_A)
    with pytest.raises(PermissionDenied, match=r"mlflow\.credentials"):
        await service.team_credentials(DEV, "ml")
    with pytest.raises(NotFound):
        await service.team_credentials(Principal.service("serving"), "ml")


async def test_an_adopted_experiment_keeps_no_grant_of_another_team(
    service: RegistryService, parts: tuple[FakeMlflow, RecordedEvents, MemoryRecords, FakeUsers]
) -> None:
    _, _, _, users = parts
    nlp = await service.team_credentials(SCHEDULER, "nlp")
    users.experiments["ml"] = "7"  # a job of nlp made an experiment named "ml"
    users.grants.add((nlp.username, "experiment", "7"))
    ml = await service.team_credentials(SCHEDULER, "ml")
    assert ml.experiment_id == "7"
    assert (nlp.username, "experiment", "7") not in users.grants
    assert (ml.username, "experiment", "7") in users.grants


async def test_a_model_made_behind_the_registrys_back_keeps_no_grant_of_another_team(
    service: RegistryService, parts: tuple[FakeMlflow, RecordedEvents, MemoryRecords, FakeUsers]
) -> None:
    mlflow, _, _, users = parts
    users.experiments["ml"] = "1"
    ml = await service.team_credentials(SCHEDULER, "ml")
    nlp = await service.team_credentials(SCHEDULER, "nlp")
    # A job of nlp made "m" through MLflow's API and tagged it as ml's.
    await mlflow.create_model("m", {"plinth.team": "ml"})
    users.grants.add((nlp.username, "registered_model", "m"))
    await service.create_version(ADMIN, name="m", team="ml", run_id=RUN_A)
    assert (nlp.username, "registered_model", "m") not in users.grants
    assert (ml.username, "registered_model", "m") in users.grants
