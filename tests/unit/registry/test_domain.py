"""The registry's rules without any engine: policy evaluation and its reasons, the names only the
registry checks, and the shared name rules as the registry applies them."""

from __future__ import annotations

import pytest

from plinth_common.errors import FailedPrecondition, InvalidArgument
from services.registry.domain import (
    LoggedModel,
    PolicyRule,
    PolicyUpdate,
    PromotionPolicy,
    Run,
    check_experiment_ids,
    check_policy,
    check_run_id,
    check_tags,
    check_update,
    enforce_policy,
    lineage_tags,
    policy_warnings,
    update_warnings,
)

RMSE = PolicyRule(metric="rmse", op="<", threshold=60)
R2 = PolicyRule(metric="r2", op=">=", threshold=0.4)


def enforce(policy: PromotionPolicy, metrics: dict[str, float], **options: object) -> None:
    enforce_policy(
        policy,
        model="m",
        alias=str(options.get("alias", "production")),
        version="3",
        metrics=metrics,
        approved=bool(options.get("approved", False)),
    )


@pytest.mark.parametrize(
    ("op", "value", "holds"),
    [
        ("<", 59.9, True),
        ("<", 60.0, False),
        ("<=", 60.0, True),
        (">", 60.0, False),
        (">=", 60.0, True),
        ("==", 60.0, True),
        ("!=", 60.0, False),
    ],
)
def test_each_operator_compares_the_metric_with_the_threshold(
    op: str, value: float, holds: bool
) -> None:
    assert PolicyRule(metric="rmse", op=op, threshold=60).holds(value) is holds


def test_the_first_rule_that_fails_is_named_with_its_value_and_reason() -> None:
    policy = PromotionPolicy(rules=(RMSE, R2))
    with pytest.raises(FailedPrecondition) as caught:
        enforce(policy, {"rmse": 63.2, "r2": 0.1})
    error = caught.value
    assert error.reason == "POLICY_VIOLATION"
    assert error.message == "policy rule rmse < 60 does not hold: rmse = 63.2"
    assert error.metadata == {"rule": "rmse < 60", "metric": "rmse", "value": "63.2"}
    with pytest.raises(FailedPrecondition, match=r"r2 >= 0.4 does not hold: r2 = 0.1"):
        enforce(policy, {"rmse": 50.0, "r2": 0.1})


def test_a_missing_metric_violates_the_rule() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        enforce(PromotionPolicy(rules=(RMSE,)), {"r2": 0.9})
    assert caught.value.reason == "POLICY_VIOLATION"
    assert "version 3 of 'm' has no metric 'rmse'" in caught.value.message


def test_approval_is_asked_for_only_once_every_rule_holds() -> None:
    policy = PromotionPolicy(rules=(RMSE,), require_approval=True)
    with pytest.raises(FailedPrecondition) as rule_first:
        enforce(policy, {"rmse": 70.0})
    assert rule_first.value.reason == "POLICY_VIOLATION", "no approval can fix a failing rule"
    with pytest.raises(FailedPrecondition) as approval:
        enforce(policy, {"rmse": 50.0})
    assert approval.value.reason == "APPROVAL_REQUIRED"
    assert approval.value.metadata == {"alias": "production"}
    enforce(policy, {"rmse": 50.0}, approved=True)


def test_the_approval_error_names_no_client_field() -> None:
    # The SDK's docstring names approved=True and the CLI appends its --approve: the server's
    # message says what the policy asks for, in words fit for both.
    with pytest.raises(FailedPrecondition) as caught:
        enforce(PromotionPolicy(require_approval=True), {})
    assert caught.value.message == "policy of 'm' requires approval to move alias 'production'"


# -- changes to a stored policy ---------------------------------------------------------------

STORED = PromotionPolicy(rules=(RMSE, R2), require_approval=True, aliases=("production",))


def test_adding_a_rule_keeps_the_rest_of_the_policy() -> None:
    mae = PolicyRule(metric="mae", op="<", threshold=40)
    after = PolicyUpdate(add_rules=(mae,)).applied_to(STORED)
    assert after == PromotionPolicy(
        rules=(RMSE, R2, mae), require_approval=True, aliases=("production",)
    )


def test_a_rule_on_the_same_metric_and_op_replaces_it_in_place() -> None:
    tighter = PolicyRule(metric="rmse", op="<", threshold=50)
    floor = PolicyRule(metric="rmse", op=">", threshold=1)
    after = PolicyUpdate(add_rules=(tighter, floor)).applied_to(STORED)
    assert after.rules == (tighter, R2, floor), "another op on the metric is another rule"


def test_removals_apply_before_additions_and_flags_change_only_when_given() -> None:
    replaced = PolicyRule(metric="r2", op=">", threshold=0.5)
    update = PolicyUpdate(
        remove_rule_metrics=("rmse", "r2"), add_rules=(replaced,), require_approval=False
    )
    after = update.applied_to(STORED)
    assert after == PromotionPolicy(rules=(replaced,), aliases=("production",))
    every_alias = PolicyUpdate(aliases=()).applied_to(STORED)
    assert every_alias.aliases == () and every_alias.rules == STORED.rules


def test_an_empty_change_changes_nothing() -> None:
    assert PolicyUpdate().applied_to(STORED) == STORED
    assert PolicyUpdate().applied_to(PromotionPolicy()).empty


@pytest.mark.parametrize(
    ("update", "field"),
    [
        (PolicyUpdate(add_rules=(PolicyRule(metric="rmse", op="=<", threshold=1),)), "op"),
        (PolicyUpdate(remove_rule_metrics=("rm`se",)), "remove_rule_metrics"),
        (PolicyUpdate(aliases=("latest",)), "aliases"),
    ],
)
def test_invalid_changes_name_their_field(update: PolicyUpdate, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_update(update)
    assert caught.value.field.startswith("update.") and caught.value.field.endswith(field)


def test_a_rule_on_a_metric_no_version_has_warns_with_the_closest_names() -> None:
    policy = PromotionPolicy(rules=(PolicyRule(metric="rsme", op="<", threshold=70), R2))
    warnings = policy_warnings(policy, model="diabetes", known_metrics=["rmse", "r2", "mae"])
    assert warnings == [
        "no version of 'diabetes' has a metric 'rsme' (did you mean 'rmse'?): promotions the "
        "policy guards fail until one does"
    ]
    far = policy_warnings(
        PromotionPolicy(rules=(PolicyRule(metric="auc", op=">", threshold=0.9),)),
        model="diabetes",
        known_metrics=["rmse", "r2"],
    )
    assert len(far) == 1 and "(its versions have: r2, rmse)" in far[0]
    assert policy_warnings(STORED, model="diabetes", known_metrics=["rmse", "r2"]) == []


def test_removing_a_rule_that_is_not_there_warns() -> None:
    update = PolicyUpdate(remove_rule_metrics=("rsme", "rmse"))
    assert update_warnings(update, before=STORED) == [
        "the policy had no rule on metric 'rsme' to remove (did you mean 'rmse'?)"
    ]


def test_a_policy_guarding_aliases_but_demanding_nothing_warns() -> None:
    warnings = policy_warnings(
        PromotionPolicy(aliases=("production",)), model="diabetes", known_metrics=[]
    )
    assert len(warnings) == 1 and "guards nothing" in warnings[0]


def test_a_policy_guards_only_its_aliases_and_an_empty_one_nothing() -> None:
    policy = PromotionPolicy(rules=(RMSE,), aliases=("production",))
    enforce(policy, {"rmse": 99.0}, alias="staging")
    with pytest.raises(FailedPrecondition):
        enforce(policy, {"rmse": 99.0}, alias="production")
    assert PromotionPolicy(aliases=("production",)).guards("production") is False
    enforce(PromotionPolicy(), {}, alias="production")


def test_a_stored_policy_that_cannot_be_read_blocks_promotion() -> None:
    with pytest.raises(FailedPrecondition, match="unreadable"):
        PromotionPolicy.from_json('{"rules": [{"metric": "rmse"}]}')


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (PromotionPolicy(rules=(PolicyRule(metric="rmse", op="=<", threshold=1),)), "op"),
        (PromotionPolicy(rules=(PolicyRule(metric="", op="<", threshold=1),)), "metric"),
        (
            PromotionPolicy(rules=(PolicyRule(metric="x", op="<", threshold=float("inf")),)),
            "threshold",
        ),
    ],
)
def test_invalid_rules_name_their_field(policy: PromotionPolicy, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_policy(policy)
    assert caught.value.field == f"policy.rules[0].{field}"


def test_policy_aliases_follow_the_shared_alias_rule() -> None:
    with pytest.raises(InvalidArgument, match="reserved by MLflow") as caught:
        check_policy(PromotionPolicy(require_approval=True, aliases=("latest",)))
    assert caught.value.field == "policy.aliases"


def test_registry_names_refuse_what_mlflow_or_paths_would_misread() -> None:
    with pytest.raises(InvalidArgument, match="set by the platform"):
        check_tags({"plinth.job_id": "j"})
    with pytest.raises(InvalidArgument, match="not a valid tag key"):
        check_tags({"a..b": "x"})
    with pytest.raises(InvalidArgument) as caught:
        check_run_id("-x")
    assert caught.value.field == "run_id"
    with pytest.raises(InvalidArgument, match="'1; DROP' is not an experiment id"):
        check_experiment_ids(["1", "1; DROP"])


def test_lineage_tags_tie_a_version_to_its_job_run_model_and_metrics() -> None:
    run = Run(
        run_id="r1",
        experiment_id="1",
        status="FINISHED",
        start_time=None,
        end_time=None,
        metrics={"rmse": 55.5},
        params={},
        tags={},
        artifact_uri="",
    )
    model = LoggedModel(
        model_id="m-1", name="model", source_run_id="r1", artifact_location="", status="READY"
    )
    tags = lineage_tags(run=run, model=model, job_id="j-1", entrypoint=["python", "a b.py"])
    assert tags == {
        "plinth.run_id": "r1",
        "plinth.model_id": "m-1",
        "plinth.job_id": "j-1",
        "plinth.entrypoint": "python 'a b.py'",
        "plinth.metric.rmse": "55.5",
    }
