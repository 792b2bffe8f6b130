"""The registry's pure parts: policy rules, name rules, model URIs, and the read cache."""

from __future__ import annotations

import asyncio

import pytest

from plinth_common.errors import FailedPrecondition, InvalidArgument
from plinth_common.names import check_alias, check_model_name
from services.registry.cache import ReadCache
from services.registry.domain import (
    PolicyRule,
    PromotionPolicy,
    check_artifact_path,
    check_tags,
    enforce_policy,
    parse_model_uri,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

RMSE_BELOW_60 = PromotionPolicy(rules=(PolicyRule(metric="rmse", op="<", threshold=60),))


async def test_policy_names_the_failing_rule_and_the_actual_value() -> None:
    enforce_policy(
        RMSE_BELOW_60,
        model="m",
        alias="production",
        version="1",
        metrics={"rmse": 59.9},
        approved=False,
    )
    with pytest.raises(
        FailedPrecondition, match=r"^policy rule rmse < 60 does not hold: rmse = 63.2$"
    ):
        enforce_policy(
            RMSE_BELOW_60,
            model="m",
            alias="production",
            version="2",
            metrics={"rmse": 63.2},
            approved=True,
        )
    with pytest.raises(FailedPrecondition, match="has no metric 'rmse'"):
        enforce_policy(
            RMSE_BELOW_60, model="m", alias="production", version="3", metrics={}, approved=True
        )


async def test_policy_approval_and_guarded_aliases() -> None:
    policy = PromotionPolicy(require_approval=True, aliases=("production",))
    with pytest.raises(FailedPrecondition, match="requires approval"):
        enforce_policy(
            policy, model="m", alias="production", version="1", metrics={}, approved=False
        )
    enforce_policy(policy, model="m", alias="production", version="1", metrics={}, approved=True)
    enforce_policy(policy, model="m", alias="staging", version="1", metrics={}, approved=False)


async def test_policy_round_trips_through_its_tag_and_refuses_garbage() -> None:
    policy = PromotionPolicy(
        rules=(PolicyRule(metric="r2", op=">=", threshold=0.4),),
        require_approval=True,
        aliases=("production",),
    )
    assert PromotionPolicy.from_json(policy.to_json()) == policy
    with pytest.raises(FailedPrecondition):
        PromotionPolicy.from_json("{not json")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "a b", "x" * 129])
async def test_model_names_refuse_paths(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_model_name(name)


@pytest.mark.parametrize("path", ["../model", "/model", "a//b", "a/../b", "."])
async def test_artifact_paths_refuse_traversal(path: str) -> None:
    with pytest.raises(InvalidArgument):
        check_artifact_path(path)


async def test_aliases_and_tags_follow_mlflow_and_reserve_plinth_keys() -> None:
    assert check_alias("production") == "production"
    for alias in ("latest", "LATEST", "v2", "a/b"):
        with pytest.raises(InvalidArgument):
            check_alias(alias)
    with pytest.raises(InvalidArgument, match="set by the platform"):
        check_tags({"plinth.team": "x"})
    assert check_tags({"plinth.team": "x"}, allow_reserved=True) == {"plinth.team": "x"}


async def test_model_uris_of_job_outputs() -> None:
    run = "a" * 32
    assert parse_model_uri(f"runs:/{run}/model", run_id=run).artifact_path == "model"
    assert parse_model_uri("", run_id=run).run_id == run
    assert parse_model_uri(f"models:/m-{'b' * 32}", run_id=run).model_id == f"m-{'b' * 32}"
    with pytest.raises(InvalidArgument, match="model_uri"):
        parse_model_uri(f"runs:/{'c' * 32}/model", run_id=run)
    with pytest.raises(InvalidArgument, match="model_uri"):
        parse_model_uri("s3://bucket/model", run_id=run)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_cache_serves_within_ttl_and_forgets_on_write() -> None:
    clock = Clock()
    cache = ReadCache(ttl_s=2.0, clock=clock)
    loads: list[int] = []

    async def load() -> int:
        loads.append(1)
        return len(loads)

    assert await cache.get("k", load) == 1
    assert await cache.get("k", load) == 1
    clock.now = 2.5
    assert await cache.get("k", load) == 2
    cache.invalidate()
    assert await cache.get("k", load) == 3
    assert ReadCache(ttl_s=0).enabled is False


async def test_cache_shares_one_load_and_drops_a_load_that_raced_a_write() -> None:
    cache = ReadCache(ttl_s=60.0)
    release = asyncio.Event()
    loads: list[str] = []

    async def slow() -> str:
        loads.append("old")
        await release.wait()
        return "old"

    waiters = [asyncio.create_task(cache.get("k", slow)) for _ in range(3)]
    await asyncio.sleep(0)
    cache.invalidate()  # a write lands while the load is in flight
    release.set()
    assert await asyncio.gather(*waiters) == ["old"] * 3 and loads == ["old"]

    async def fresh() -> str:
        return "new"

    assert await cache.get("k", fresh) == "new", "the raced load must not have been stored"
