"""The registry's rules without any engine: policy evaluation and its reasons, the names only the
registry checks, and the shared name rules as the registry applies them."""

from __future__ import annotations

import pytest

from plinth_common.errors import FailedPrecondition, InvalidArgument
from services.registry.domain import (
    LoggedModel,
    PolicyRule,
    PromotionPolicy,
    Run,
    check_experiment_ids,
    check_policy,
    check_run_id,
    check_tags,
    enforce_policy,
    lineage_tags,
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
