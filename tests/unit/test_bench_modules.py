"""The benchmarks still import and still have their entry point: no test runs them (they take
minutes and print rather than assert), and some reuse each other's helpers (``bench.metrics_cost``
those of ``bench.inference`` and ``bench.gateway_overhead``), so a rename in one would otherwise
break another unnoticed until someone runs ``make bench``."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(info.name for info in pkgutil.iter_modules([str(BENCH)]))
#: Imported by the others, not run on their own.
HELPERS = {"common"}


def test_every_benchmark_is_found() -> None:
    assert {"metrics_cost", "inference", "gateway_overhead", "common"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_a_benchmark_imports_and_has_its_entry_point(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    if name not in HELPERS:
        assert callable(getattr(module, "main", None)), f"bench.{name} has no main()"
