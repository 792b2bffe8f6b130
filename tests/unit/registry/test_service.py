"""The registry service with a fake MLflow store and an event recorder: registration from jobs,
ownership, promotion ordering under a policy, and errors naming what is wrong."""

from __future__ import annotations

import asyncio

import pytest

from plinth_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.registry.cache import ReadCache
from services.registry.domain import FinishedJob, PolicyRule, PolicyUpdate, PromotionPolicy
from services.registry.service import RegistryService
from tests.helpers import ADMIN
from tests.unit.registry.fakes import FakeMlflow, FakeUsers, MemoryRecords, RecordedEvents

pytestmark = pytest.mark.asyncio(loop_scope="session")

RUN_A, RUN_B, RUN_C = "a" * 32, "b" * 32, "c" * 32


@pytest.fixture
def mlflow() -> FakeMlflow:
    fake = FakeMlflow()
    fake.add_run(RUN_A, {"rmse": 55.0})
    fake.add_run(RUN_B, {"rmse": 63.2})
    fake.add_run(RUN_C, {"rmse": 41.0})
    return fake


@pytest.fixture
def events() -> RecordedEvents:
    return RecordedEvents()


@pytest.fixture
def records() -> MemoryRecords:
    return MemoryRecords()


@pytest.fixture
def users() -> FakeUsers:
    return FakeUsers()


@pytest.fixture
def service(
    mlflow: FakeMlflow, events: RecordedEvents, records: MemoryRecords, users: FakeUsers
) -> RegistryService:
    events.records = records
    return RegistryService(
        mlflow=mlflow,
        events=events,
        cache=ReadCache(ttl_s=60.0),
        facts=ReadCache(ttl_s=60.0),
        records=records,
        users=users,
    )


def job(job_id: str, run_id: str, *, name: str = "diabetes", team: str = "ml") -> FinishedJob:
    return FinishedJob(
        job_id=job_id,
        team=team,
        succeeded=True,
        register_as=name,
        mlflow_run_id=run_id,
        model_uri=f"runs:/{run_id}/model",
        entrypoint=("python", "train.py"),
    )


async def register_three(service: RegistryService) -> None:
    for run_id in (RUN_A, RUN_B, RUN_C):
        await service.create_version(ADMIN, name="diabetes", team="ml", run_id=run_id)


# -- registration ---------------------------------------------------------------------------


async def test_a_finished_job_registers_once_however_often_it_is_handled(
    service: RegistryService, mlflow: FakeMlflow, events: RecordedEvents
) -> None:
    first = await service.register_finished_job(job("j-1", RUN_A))
    again = await service.register_finished_job(job("j-1", RUN_A))
    assert first is not None and again is not None
    assert (first.version, again.version) == ("1", "1")
    assert [v for (n, v) in mlflow.versions] == ["1"]
    assert first.team == "ml" and first.tags["plinth.job_id"] == "j-1"
    assert first.tags["plinth.entrypoint"] == "python train.py"
    # The consumer records the event for a job, in its own transaction: not the service.
    assert events.created == []


async def test_jobs_that_failed_or_asked_nothing_register_nothing(
    service: RegistryService, mlflow: FakeMlflow
) -> None:
    failed = FinishedJob(
        job_id="j-f", team="ml", succeeded=False, register_as="m", mlflow_run_id=RUN_A, model_uri=""
    )
    silent = FinishedJob(
        job_id="j-s", team="ml", succeeded=True, register_as="", mlflow_run_id=RUN_A, model_uri=""
    )
    assert await service.register_finished_job(failed) is None
    assert await service.register_finished_job(silent) is None
    assert mlflow.versions == {}


async def test_another_teams_model_is_refused_naming_its_owner(
    service: RegistryService, events: RecordedEvents
) -> None:
    await service.create_version(ADMIN, name="diabetes", team="ml", run_id=RUN_A)
    with pytest.raises(PermissionDenied, match="belongs to team 'ml'") as caught:
        await service.create_version(ADMIN, name="diabetes", team="nlp", run_id=RUN_B)
    assert caught.value.details["owner"] == "ml"
    with pytest.raises(PermissionDenied):
        await service.register_finished_job(job("j-2", RUN_B, team="nlp"))
    assert [v.version for v, _ in events.created] == ["1"]


async def test_a_run_without_the_named_model_is_not_found(service: RegistryService) -> None:
    with pytest.raises(NotFound, match=f"runs:/{RUN_A}/other"):
        await service.create_version(
            ADMIN, name="diabetes", team="ml", run_id=RUN_A, artifact_path="other"
        )


# -- promotion ------------------------------------------------------------------------------


async def test_promotions_report_the_version_they_replace_in_order(
    service: RegistryService, events: RecordedEvents
) -> None:
    await register_three(service)
    moves = [
        await service.set_alias(ADMIN, name="diabetes", alias="production", version=v)
        for v in "123"
    ]
    assert [(p.version.version, p.previous_version) for p in moves] == [
        ("1", ""),
        ("2", "1"),
        ("3", "2"),
    ]
    assert events.promotions == moves, "one event per move, in the order of the moves"
    assert moves[-1].version.aliases == ("production",)
    assert (await service.version_by_alias(ADMIN, "diabetes", "production")).version == "3"


async def test_concurrent_promotions_of_one_model_form_one_chain(
    service: RegistryService, events: RecordedEvents
) -> None:
    await register_three(service)
    moves = await asyncio.gather(
        *(service.set_alias(ADMIN, name="diabetes", alias="production", version=v) for v in "123")
    )
    # Serialized per model: each move's previous version is the one moved before it, so no two
    # moves claim to replace the same version and the events tell one consistent history.
    chain = {p.previous_version: p.version.version for p in moves}
    assert len(chain) == 3 and "" in chain
    order = [chain[""]]
    while order[-1] in chain:
        order.append(chain[order[-1]])
    assert order == [p.version.version for p in events.promotions]


async def test_moving_an_alias_to_where_it_points_emits_again(
    service: RegistryService, events: RecordedEvents
) -> None:
    await register_three(service)
    await service.set_alias(ADMIN, name="diabetes", alias="production", version="1")
    repeat = await service.set_alias(ADMIN, name="diabetes", alias="production", version="1")
    assert repeat.previous_version == "1" and len(events.promotions) == 2


async def test_policy_refusals_carry_their_reason_and_move_nothing(
    service: RegistryService, mlflow: FakeMlflow, events: RecordedEvents
) -> None:
    await register_three(service)
    policy = PromotionPolicy(
        rules=(PolicyRule(metric="rmse", op="<", threshold=60),),
        require_approval=True,
        aliases=("production",),
    )
    await service.set_policy(ADMIN, name="diabetes", policy=policy, team="ml")
    with pytest.raises(FailedPrecondition) as violation:
        await service.set_alias(
            ADMIN, name="diabetes", alias="production", version="2", approved=True
        )
    assert violation.value.reason == "POLICY_VIOLATION"
    assert violation.value.message == "policy rule rmse < 60 does not hold: rmse = 63.2"
    with pytest.raises(FailedPrecondition) as approval:
        await service.set_alias(ADMIN, name="diabetes", alias="production", version="1")
    assert approval.value.reason == "APPROVAL_REQUIRED"
    assert "set_alias" not in mlflow.calls and events.promotions == []
    # The policy guards production only.
    staging = await service.set_alias(ADMIN, name="diabetes", alias="staging", version="2")
    assert staging.alias == "staging" and len(events.promotions) == 1


async def test_the_policy_reads_metrics_fresh_not_from_the_cache(
    service: RegistryService, mlflow: FakeMlflow
) -> None:
    await register_three(service)
    policy = PromotionPolicy(rules=(PolicyRule(metric="rmse", op="<", threshold=60),))
    await service.set_policy(ADMIN, name="diabetes", policy=policy)
    assert (await service.get_version(ADMIN, "diabetes", "1")).metrics == {
        "rmse": 55.0
    }  # now cached
    mlflow.add_run(RUN_A, {"rmse": 70.0})  # the run was updated behind the registry's back
    with pytest.raises(FailedPrecondition, match="rmse = 70"):
        await service.set_alias(ADMIN, name="diabetes", alias="production", version="1")


# -- policy changes ----------------------------------------------------------------------------

RMSE_60 = PolicyRule(metric="rmse", op="<", threshold=60)


async def guarded(service: RegistryService) -> None:
    await register_three(service)
    await service.set_policy(
        ADMIN,
        name="diabetes",
        policy=PromotionPolicy(rules=(RMSE_60,), require_approval=True, aliases=("production",)),
    )


async def test_adding_a_rule_keeps_the_approval_requirement(
    service: RegistryService, mlflow: FakeMlflow
) -> None:
    await guarded(service)
    rmse_70 = PolicyRule(metric="rmse", op="<", threshold=70)
    outcome = await service.update_policy(
        ADMIN, name="diabetes", update=PolicyUpdate(add_rules=(rmse_70,)), team="ml"
    )
    # The rule on rmse with the same op is replaced; approval and aliases are kept.
    expected = PromotionPolicy(rules=(rmse_70,), require_approval=True, aliases=("production",))
    assert outcome.model.policy == expected and outcome.warnings == ()
    assert (await service.get_policy(ADMIN, "diabetes")).model.policy == expected, "as stored"
    with pytest.raises(FailedPrecondition) as caught:
        await service.set_alias(ADMIN, name="diabetes", alias="production", version="2")
    assert caught.value.reason == "APPROVAL_REQUIRED", "63.2 < 70 holds; approval still asked"
    assert "set_alias" not in mlflow.calls


async def test_replacing_the_policy_drops_what_it_does_not_say(service: RegistryService) -> None:
    await guarded(service)
    rmse_70 = PolicyRule(metric="rmse", op="<", threshold=70)
    outcome = await service.set_policy(
        ADMIN, name="diabetes", policy=PromotionPolicy(rules=(rmse_70,))
    )
    assert outcome.model.policy == PromotionPolicy(rules=(rmse_70,))
    promoted = await service.set_alias(ADMIN, name="diabetes", alias="production", version="2")
    assert promoted.version.version == "2"


async def test_a_change_that_leaves_nothing_removes_the_policy(
    service: RegistryService, mlflow: FakeMlflow
) -> None:
    await guarded(service)
    outcome = await service.update_policy(
        ADMIN,
        name="diabetes",
        update=PolicyUpdate(remove_rule_metrics=("rmse",), require_approval=False),
    )
    assert outcome.model.policy == PromotionPolicy()
    assert "plinth.policy" not in mlflow.models["diabetes"].tags
    assert any("guards nothing" in w for w in outcome.warnings), "the aliases went too"


async def test_a_misspelled_metric_is_stored_with_a_warning_naming_the_real_one(
    service: RegistryService,
) -> None:
    await guarded(service)
    typo = PolicyRule(metric="rsme", op="<", threshold=70)
    outcome = await service.update_policy(
        ADMIN, name="diabetes", update=PolicyUpdate(add_rules=(typo,))
    )
    assert outcome.model.policy.rules == (RMSE_60, typo), "a later version may log it"
    assert len(outcome.warnings) == 1
    assert "'rsme'" in outcome.warnings[0] and "did you mean 'rmse'?" in outcome.warnings[0]
    assert (await service.get_policy(ADMIN, "diabetes")).warnings == outcome.warnings
    replaced = await service.set_policy(
        ADMIN, name="diabetes", policy=PromotionPolicy(rules=(typo,))
    )
    assert replaced.warnings == outcome.warnings


async def test_metrics_a_run_logged_after_registration_count_as_known(
    service: RegistryService, mlflow: FakeMlflow
) -> None:
    await guarded(service)
    mlflow.add_run(RUN_C, {"rmse": 41.0, "mae": 30.0})  # logged later: not in the version's tags
    mae = PolicyRule(metric="mae", op="<", threshold=35)
    outcome = await service.update_policy(
        ADMIN, name="diabetes", update=PolicyUpdate(add_rules=(mae,))
    )
    assert outcome.warnings == ()


async def test_a_change_to_an_unreadable_stored_policy_is_refused_and_writes_nothing(
    service: RegistryService, mlflow: FakeMlflow
) -> None:
    await register_three(service)
    await mlflow.set_model_tag("diabetes", "plinth.policy", "{not json")
    mlflow.calls.clear()
    with pytest.raises(FailedPrecondition, match="unreadable"):
        await service.update_policy(
            ADMIN, name="diabetes", update=PolicyUpdate(require_approval=True)
        )
    assert "set_model_tag" not in mlflow.calls and "delete_model_tag" not in mlflow.calls
    # Replacing it whole is how to repair it.
    outcome = await service.set_policy(
        ADMIN, name="diabetes", policy=PromotionPolicy(require_approval=True)
    )
    assert outcome.model.policy.require_approval


async def test_only_the_owning_team_changes_the_policy(
    service: RegistryService, mlflow: FakeMlflow
) -> None:
    await guarded(service)
    with pytest.raises(PermissionDenied):
        await service.update_policy(
            ADMIN, name="diabetes", update=PolicyUpdate(require_approval=False), team="nlp"
        )
    with pytest.raises(NotFound, match="nope"):
        await service.get_policy(ADMIN, "nope")
    assert (await service.get_policy(ADMIN, "diabetes")).model.policy.require_approval


async def test_only_the_owning_team_moves_aliases(service: RegistryService) -> None:
    await register_three(service)
    with pytest.raises(PermissionDenied, match="belongs to team 'ml', not 'nlp'"):
        await service.set_alias(ADMIN, name="diabetes", alias="production", version="1", team="nlp")
    with pytest.raises(NotFound, match="diabetes/9"):
        await service.set_alias(ADMIN, name="diabetes", alias="production", version="9")


async def test_no_event_when_mlflow_refuses_the_move(
    service: RegistryService, mlflow: FakeMlflow, events: RecordedEvents
) -> None:
    await register_three(service)
    real = mlflow.set_alias

    async def refuse(name: str, alias: str, version: str) -> None:
        raise Unavailable("MLflow's backend store is busy or unreachable", dependency="MLflow")

    mlflow.set_alias = refuse  # type: ignore[method-assign]
    with pytest.raises(Unavailable) as caught:
        await service.set_alias(ADMIN, name="diabetes", alias="production", version="1")
    assert caught.value.dependency == "MLflow" and events.promotions == []
    mlflow.set_alias = real  # type: ignore[method-assign]
    assert (
        await service.set_alias(ADMIN, name="diabetes", alias="production", version="1")
    ).version


async def test_reads_answer_unavailable_naming_mlflow_when_it_is_down(
    service: RegistryService, mlflow: FakeMlflow
) -> None:
    mlflow.down = True
    with pytest.raises(Unavailable) as caught:
        await service.get_version(ADMIN, "diabetes", "1")
    assert caught.value.dependency == "MLflow" and caught.value.reason == "DEPENDENCY_UNAVAILABLE"


# -- names and paging -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.version_by_alias(ADMIN, "diabetes", "latest"), "alias"),
        (lambda s: s.version_by_alias(ADMIN, "diabetes", "v2"), "alias"),
        (lambda s: s.get_version(ADMIN, "../etc", "1"), "name"),
        (lambda s: s.get_version(ADMIN, "diabetes", "01"), "version"),
        (lambda s: s.list_versions(ADMIN, "diabetes", page_size=201, page_token=""), "page_size"),
        (
            lambda s: s.list_versions(ADMIN, "diabetes", page_size=0, page_token="garbage"),
            "page_token",
        ),
        (lambda s: s.create_version(ADMIN, name="m", team="ML", run_id=RUN_A), "team"),
        (lambda s: s.create_version(ADMIN, name="m", team="ml", run_id="../r"), "run_id"),
        (
            lambda s: s.set_alias(ADMIN, name="diabetes", alias="latest", version="1"),
            "alias",
        ),
    ],
    ids=[
        "reserved-alias",
        "version-alias",
        "path-name",
        "zero-padded-version",
        "page-too-big",
        "foreign-token",
        "upper-case-team",
        "path-run-id",
        "set-reserved-alias",
    ],
)
async def test_bad_names_are_refused_naming_the_field(
    service: RegistryService, mlflow: FakeMlflow, call: object, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await call(service)  # type: ignore[operator]
    assert caught.value.field == field
    assert mlflow.calls == [], "refused before MLflow is asked"
