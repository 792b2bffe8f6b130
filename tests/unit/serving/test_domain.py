"""Serving's domain rules, without any I/O: states, promotion ordering, rollout outcomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from plinth_common.errors import InvalidArgument
from services.serving import domain
from services.serving.domain import (
    UNSET_BATCHING,
    Deployment,
    DeploymentSpec,
    DeploymentState,
    Promotion,
    VersionRef,
)
from services.serving.signature import ModelIO, TensorSpec

T0 = datetime(2026, 1, 1, tzinfo=UTC)
IO = ModelIO(
    kind="tensor",
    inputs=(TensorSpec(name="input", datatype="FP32", dims=(2,)),),
    output=TensorSpec(name="predictions", datatype="FP32", dims=(1,)),
)


def fresh() -> Deployment:
    s = domain.validate_spec(DeploymentSpec(name="d", team="ml", model_name="m"))
    return domain.new_deployment(s, T0)


def promotion(version: str, minutes: int) -> Promotion:
    return Promotion(
        model_name="m",
        alias="production",
        version=version,
        source=f"models:/m-{version}",
        run_id="r",
        time=T0 + timedelta(minutes=minutes),
    )


def test_validate_spec_fills_defaults_and_refuses_reserved_aliases() -> None:
    s = domain.validate_spec(DeploymentSpec(name="d", team="ml", model_name="m"))
    assert s.alias == "production" and s.batching.max_batch_size == 8
    assert s.batching.instance_count == 1 and s.batching != UNSET_BATCHING
    for alias in ("latest", "v1"):
        with pytest.raises(InvalidArgument) as caught:
            domain.validate_spec(DeploymentSpec(name="d", team="ml", model_name="m", alias=alias))
        assert caught.value.field == "alias"


def test_states_follow_the_versions() -> None:
    d = fresh()
    assert d.state is DeploymentState.PENDING and d.lookup_pending
    retrying = domain.lookup_retrying(d, "down", at=T0)
    assert retrying.state is DeploymentState.PENDING and retrying.last_error == "registry: down"
    assert domain.lookup_refused(d, "no", at=T0).state is DeploymentState.FAILED
    nowhere = domain.resolved(d, None, traceparent="", at=T0)
    assert nowhere.state is DeploymentState.PENDING and not nowhere.lookup_pending
    target = domain.resolved(d, VersionRef(version="1", source="s"), traceparent="", at=T0)
    assert target.state is DeploymentState.LOADING and target.needs_rollout
    ready = domain.switched(domain.loading(target, at=T0), "1", IO, at=T0)
    assert ready.state is DeploymentState.READY and not ready.needs_rollout
    assert (ready.loading_version, ready.serving_io) == ("", IO)


def test_a_failed_target_is_failed_but_a_stale_failure_is_not() -> None:
    d = domain.retarget(fresh(), promotion("2", 1), traceparent="", at=T0)
    failed = domain.rollout_failed(d, "2", "boom", at=T0)
    assert failed.state is DeploymentState.FAILED and failed.failed_version == "2"
    assert failed.last_error == "v2: boom" and not failed.needs_rollout
    # A version that failed after the target moved on leaves the new target to roll out.
    moved = domain.retarget(d, promotion("3", 2), traceparent="", at=T0)
    stale = domain.rollout_failed(moved, "2", "boom", at=T0)
    assert stale.state is DeploymentState.LOADING and stale.needs_rollout
    # Promoting the failed version again clears the failure: it gets another try.
    again = domain.retarget(failed, promotion("2", 3), traceparent="", at=T0)
    assert again.failed_version == "" and again.needs_rollout


def test_older_promotions_do_not_move_the_target() -> None:
    newer = domain.retarget(fresh(), promotion("5", 10), traceparent="", at=T0)
    assert domain.retarget(newer, promotion("4", 5), traceparent="", at=T0) is newer
    assert domain.retarget(newer, promotion("6", 11), traceparent="", at=T0).target_version == "6"
