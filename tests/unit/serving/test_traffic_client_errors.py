"""The canary guard's numbers: callers' bad requests are not the version's errors."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from services.serving.dataplane import VersionStats
from services.serving.traffic import MergedStats

pytestmark = pytest.mark.asyncio(loop_scope="session")


class _Proxy:
    def __init__(self, stats: Mapping[str, VersionStats]) -> None:
        self._stats = stats

    async def stats(self) -> Mapping[str, VersionStats]:
        return self._stats


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
