"""``plinth_serving_rollouts_total``: the reconciler tells each rollout's outcome where it ends
(traffic moved, the load failed, the canaries were rolled back)."""

from __future__ import annotations

from plinth_common.metrics import Metrics
from services.serving.metrics import MetricsReading, ServingMetrics
from tests.helpers import ADMIN
from tests.unit.serving.conftest import Serving
from tests.unit.serving.test_service import promote, serve


async def _no_reading() -> MetricsReading:
    return MetricsReading(routed={})


async def test_completed_failed_and_rolled_back_rollouts_are_counted(serving: Serving) -> None:
    metrics = Metrics("serving")
    counted = ServingMetrics(metrics, read=_no_reading, latency_target_s=lambda d: 0.1)
    # The conftest's reconciler is built without the callback the app passes.
    serving.reconciler._on_rollout = counted.rollout

    def total(outcome: str) -> float:
        value = metrics.registry.get_sample_value(
            "plinth_serving_rollouts_total", {"outcome": outcome}
        )
        return value or 0.0

    await serve(serving, "diab", "1")
    assert (total("completed"), total("failed"), total("rolled_back")) == (1, 0, 0)
    serving.models.failing["diab__v2"] = "the model failed to load in Triton: boom"
    await promote(serving, "2", minute=1)
    await serving.reconcile()
    assert (total("completed"), total("failed")) == (1, 1)
    del serving.models.failing["diab__v2"]
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    assert await serving.reconciler.roll_back("diab", "canary v2 error rate 50%")
    assert not await serving.reconciler.roll_back("diab", "nothing left to roll back")
    assert (total("completed"), total("failed"), total("rolled_back")) == (1, 1, 1)
