"""The canary guard's numbers: callers' bad requests are not the version's errors, and a
few seconds of a cold canary are no verdict."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from services.serving.dataplane import VersionStats
from services.serving.dataplane.tables import LATENCY_BOUNDS_MS
from services.serving.traffic import CanaryGuard, MergedStats
from tests.helpers import ADMIN
from tests.unit.serving.conftest import Serving
from tests.unit.serving.test_service import serve

pytestmark = pytest.mark.asyncio(loop_scope="session")


class _Proxy:
    def __init__(self, stats: Mapping[str, VersionStats]) -> None:
        self.now = stats

    async def stats(self) -> Mapping[str, VersionStats]:
        return self.now


class _Triton:
    """Triton's statistics: ``fail`` counts the requests it refused as malformed too."""

    def __init__(self, counts: Mapping[str, tuple[int, int]]) -> None:
        self._counts = counts

    async def statistics(self, model: str) -> tuple[int, int]:
        return self._counts[model]


async def test_wrong_tensors_at_a_canary_are_not_counted_as_its_errors() -> None:
    # 40 requests, all refused by Triton as INVALID_ARGUMENT: the data plane counts 0 errors
    merged = MergedStats(
        proxy=_Proxy({"diab/2": VersionStats(requests=40, errors=0)}),
        engine=_Triton({"diab__v2": (0, 40)}),
        models=lambda: {"diab/2": "diab__v2"},
    )
    counted = (await merged.stats())["diab/2"]
    assert (counted.requests, counted.errors) == (40, 0)


async def test_without_a_data_plane_tritons_failures_are_the_errors() -> None:
    merged = MergedStats(
        proxy=None,
        engine=_Triton({"diab__v2": (30, 10)}),
        models=lambda: {"diab/2": "diab__v2"},
    )
    counted = (await merged.stats())["diab/2"]
    assert (counted.requests, counted.errors) == (40, 10)


async def test_a_canary_is_not_judged_on_a_window_shorter_than_half_its_slo_window(
    serving: Serving,
) -> None:
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    stats, t = _Proxy({}), [0.0]
    guard = CanaryGuard(stats=stats, canaries=serving.reconciler, clock=lambda: t[0])
    slow = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    stats.now = {"diab/2": VersionStats(requests=0, errors=0)}
    assert await guard.check_once() == []
    # a cold start: 36 slow requests over its first 2 s of a 60 s SLO window
    slow[-2] = 36
    t[0] = 2.0
    stats.now = {"diab/2": VersionStats(requests=36, errors=0, buckets=tuple(slow))}
    assert await guard.check_once() == []
    assert (await serving.service.get(ADMIN, "diab")).traffic == {"1": 90, "2": 10}
    # still slow over half the window: rolled back
    slow[-2] = 400
    t[0] = 31.0
    stats.now = {"diab/2": VersionStats(requests=400, errors=0, buckets=tuple(slow))}
    assert await guard.check_once() == ["diab"]
