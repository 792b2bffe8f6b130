"""The registry's promotions metric: each promotion the policy decided is told with its team
and outcome (promoted, refused by a rule, awaiting approval); a caller refused before any
policy (not found) is not a promotion."""

from __future__ import annotations

import pytest

from plinth_common.auth import Role
from plinth_common.errors import FailedPrecondition, NotFound
from services.registry.cache import ReadCache
from services.registry.domain import PolicyRule, PromotionPolicy
from services.registry.service import RegistryService
from tests.helpers import ADMIN, member
from tests.unit.registry.fakes import FakeMlflow, MemoryRecords, RecordedEvents

pytestmark = pytest.mark.asyncio(loop_scope="session")

RUN = "a" * 32
ANN = member("ann", ml=Role.MAINTAINER)
DEV = member("dev", ml=Role.DEVELOPER)


async def test_outcomes_are_counted_per_team() -> None:
    told: list[tuple[str, str]] = []
    mlflow = FakeMlflow()
    mlflow.add_run(RUN, {"rmse": 50.0})
    records = MemoryRecords()
    service = RegistryService(
        mlflow=mlflow,
        events=RecordedEvents(records=records),
        cache=ReadCache(ttl_s=60.0),
        facts=ReadCache(ttl_s=60.0),
        records=records,
        on_promotion=lambda team, outcome: told.append((team, outcome)),
    )
    await service.create_version(ADMIN, name="m", team="ml", run_id=RUN)
    await service.set_alias(DEV, name="m", alias="candidate", version="1")
    await service.set_policy(ADMIN, name="m", policy=PromotionPolicy(require_approval=True))
    with pytest.raises(FailedPrecondition):
        await service.set_alias(DEV, name="m", alias="staging", version="1")
    await service.set_policy(
        ADMIN,
        name="m",
        policy=PromotionPolicy(rules=(PolicyRule(metric="rmse", op="<", threshold=10.0),)),
    )
    with pytest.raises(FailedPrecondition, match="rmse"):
        await service.set_alias(DEV, name="m", alias="staging", version="1")
    with pytest.raises(NotFound):
        await service.set_alias(member("eve", nlp=Role.DEVELOPER), name="m", alias="x", version="1")
    assert told == [("ml", "promoted"), ("ml", "awaiting_approval"), ("ml", "refused")]
