"""Serving's metrics: the data plane's counters re-exported exactly and monotonic across an
HAProxy restart, the Python path's per-request counts, Triton's metrics relabelled by
deployment, and each deployment's latency target from the SLO settings."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from plinth_common.errors import InvalidArgument, NotFound, Unavailable
from plinth_common.grpc_server import UpstreamStatus
from plinth_common.metrics import CATALOG, INFERENCE_BUCKETS_S, Metrics
from plinth_common.rich_status import RichDetails
from services.gateway.monitor import parse_exposition, restarted
from services.serving.dataplane.tables import LATENCY_BOUNDS_MS, VersionStats
from services.serving.inference import server_fault
from services.serving.metrics import (
    InferenceCollector,
    MetricsReading,
    MonotonicCounts,
    PythonPathCounts,
    ServingMetrics,
    Tally,
    latency_targets,
    read_plane,
    relabel_triton,
    tally_from_buckets,
)

BOUNDS_S = [b / 1000 for b in LATENCY_BOUNDS_MS]


def _stats(requests: int, errors: int, latencies_ms: list[float]) -> VersionStats:
    buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    for ms in latencies_ms:
        index = next((i for i, b in enumerate(LATENCY_BOUNDS_MS) if ms <= b), -1)
        buckets[index] += 1
    return VersionStats(
        requests=requests, errors=errors, total_ms=sum(latencies_ms), buckets=tuple(buckets)
    )


@dataclass
class FakePlane:
    """A data plane that reports what a test sets, under its pid."""

    pid: int | None
    counters: dict[str, VersionStats]

    async def stats(self) -> Mapping[str, VersionStats]:
        return self.counters


def test_the_catalog_buckets_are_the_data_planes_bounds() -> None:
    assert [round(b * 1000, 6) for b in INFERENCE_BUCKETS_S] == list(LATENCY_BOUNDS_MS)
    assert 0.1 in INFERENCE_BUCKETS_S  # the inference-latency SLO's default target
    assert all(spec.wired for name, spec in CATALOG.items() if name.startswith("plinth_serving_"))


def test_slow_requests_count_those_above_the_target() -> None:
    stats = _stats(5, 1, [0.4, 80, 100, 120, 3000])
    tally = tally_from_buckets(
        requests=stats.requests,
        errors=stats.errors,
        sum_s=stats.total_ms / 1000,
        bounds_s=BOUNDS_S,
        counts=stats.buckets,
        target_s=0.1,
    )
    assert (tally.requests, tally.errors, tally.slow) == (5, 1, 2)  # 120 ms and 3 s
    assert tally.buckets == list(stats.buckets)
    # A target between two bounds counts against the bound below it (120 ms is in (100, 150]).
    between = tally_from_buckets(
        requests=5, errors=1, sum_s=0, bounds_s=BOUNDS_S, counts=stats.buckets, target_s=0.13
    )
    assert between.slow == 2


def test_other_bounds_fold_into_the_next_catalog_bucket() -> None:
    tally = tally_from_buckets(
        requests=3,
        errors=0,
        sum_s=0.0,
        bounds_s=[0.004, 0.1],
        counts=[1, 1, 1],
        target_s=0.1,
    )
    assert tally.buckets[INFERENCE_BUCKETS_S.index(0.005)] == 1
    assert tally.buckets[INFERENCE_BUCKETS_S.index(0.1)] == 1
    assert tally.buckets[-1] == 1 and tally.slow == 1


def _tally(requests: int, errors: int = 0) -> Tally:
    buckets = [0] * (len(INFERENCE_BUCKETS_S) + 1)
    buckets[0] = requests
    return Tally(requests=requests, errors=errors, buckets=buckets)


def test_counters_stay_monotonic_across_a_data_plane_restart() -> None:
    counts = MonotonicCounts()
    key = ("diab", "1")
    assert counts.update(100, {key: _tally(7, 2)})[key].requests == 7
    assert counts.update(100, {key: _tally(9, 2)})[key].requests == 9
    # A new HAProxy (another pid) starts from zero: the old one's 9 are kept.
    after = counts.update(200, {key: _tally(3, 1)})[key]
    assert (after.requests, after.errors, after.buckets[0]) == (12, 3, 12)
    # A version the new one has not seen yet still shows what the old one counted.
    other = ("diab", "2")
    counts.update(200, {key: _tally(4, 1), other: _tally(5)})
    shown = counts.update(300, {})
    assert shown[key].requests == 13 and shown[other].requests == 5
    # Counters that went down under the same pid (pid unknown to us) restart as well.
    counts.update(300, {key: _tally(6)})
    assert counts.update(300, {key: _tally(1)})[key].requests == 13 + 6 + 1
    assert counts.totals()[key].requests == 20


def test_the_python_path_counts_each_request_in_its_bucket() -> None:
    counts = PythonPathCounts(lambda deployment: 0.05 if deployment == "fast" else 0.1)
    counts.record("fast", "1", 0.0004, failed=False)
    counts.record("fast", "1", 0.06, failed=True)
    counts.record("slowish", "3", 0.06, failed=False)
    snap = counts.snapshot()
    fast, other = snap[("fast", "1")], snap[("slowish", "3")]
    assert (fast.requests, fast.errors, fast.slow) == (2, 1, 1)
    assert fast.buckets[0] == 1 and fast.buckets[INFERENCE_BUCKETS_S.index(0.075)] == 1
    assert (other.requests, other.errors, other.slow) == (1, 0, 0)
    assert math.isclose(fast.sum_s, 0.0604)


TRITON_TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="diab__v1",version="1"} 20
nv_inference_request_success{model="diab__v2",version="1"} 4
nv_inference_request_success{model="gone__v9",version="1"} 1
# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="diab__v1",version="1"} 0
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.5
"""


def test_triton_metrics_are_relabelled_by_deployment_and_version() -> None:
    routed = {"diab/1": "diab__v1", "diab/2": "diab__v2"}
    families = {f.name: f for f in relabel_triton(TRITON_TEXT, routed)}
    assert set(families) == {"nv_inference_request_success", "nv_inference_pending_request_count"}
    success = families["nv_inference_request_success"]
    assert {
        (s.name, s.labels["deployment"], s.labels["version"], s.value) for s in success.samples
    } == {
        ("nv_inference_request_success", "diab", "1", 20),
        ("nv_inference_request_success", "diab", "2", 4),
    }
    assert all("model" not in s.labels for s in success.samples)


def test_one_triton_model_with_several_versions_is_told_apart_by_its_version() -> None:
    text = (
        "# TYPE nv_inference_request_success counter\n"
        'nv_inference_request_success{model="diab",version="3"} 5\n'
        'nv_inference_request_success{model="diab",version="4"} 6\n'
    )
    families = relabel_triton(text, {"diab/3": "diab", "diab/4": "diab"})
    got = {(s.labels["version"], s.value) for s in families[0].samples}
    assert got == {("3", 5), ("4", 6)}


async def test_read_plane_keys_by_deployment_and_version_and_skips_a_restart() -> None:
    plane = FakePlane(pid=41, counters={"diab/2": _stats(3, 1, [1, 2, 200])})
    reading = await read_plane(
        plane, {"diab/2": "diab__v2"}, bounds_ms=LATENCY_BOUNDS_MS, latency_target_s=lambda d: 0.1
    )
    assert reading.proxy_pid == 41 and reading.proxy is not None
    assert reading.proxy[("diab", "2")].slow == 1

    class Restarting(FakePlane):
        async def stats(self) -> Mapping[str, VersionStats]:
            self.pid = 42
            return self.counters

    moved = await read_plane(
        Restarting(pid=41, counters={}),
        {},
        bounds_ms=LATENCY_BOUNDS_MS,
        latency_target_s=lambda d: 0.1,
    )
    assert moved.proxy is None


async def test_a_scrape_shows_the_data_plane_plus_the_python_path_and_triton() -> None:
    metrics = Metrics("serving")
    plane = FakePlane(pid=7, counters={"diab/1": _stats(4, 1, [1, 2, 3, 150])})

    async def read() -> MetricsReading:
        return await read_plane(
            plane,
            {"diab/1": "diab__v1"},
            bounds_ms=LATENCY_BOUNDS_MS,
            latency_target_s=lambda d: 0.1,
        )

    serving = ServingMetrics(
        metrics, read=read, latency_target_s=lambda d: 0.1, triton_metrics_url="http://triton"
    )
    serving.collector._fetch = lambda url: TRITON_TEXT  # no Triton in a unit test
    serving.bind(asyncio.get_running_loop())
    assert serving.python_path is not None
    serving.python_path.record("diab", "1", 0.2, failed=True)
    serving.rollout("completed")

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = metrics.exposition(openmetrics=False).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    first = await asyncio.to_thread(scrape)
    labels = (("deployment", "diab"), ("version", "1"))
    assert first[("plinth_serving_inference_requests_total", labels)] == 5
    assert first[("plinth_serving_inference_errors_total", labels)] == 2
    assert first[("plinth_serving_inference_slow_requests_total", labels)] == 2
    le = (("deployment", "diab"), ("le", "0.003"), ("version", "1"))
    assert first[("plinth_serving_inference_request_duration_seconds_bucket", le)] == 3
    assert first[("plinth_serving_inference_request_duration_seconds_count", labels)] == 5
    assert first[("nv_inference_request_success", labels)] == 20
    assert first[("plinth_serving_rollouts_total", (("outcome", "completed"),))] == 1
    # HAProxy restarted: it counts from zero, the export does not.
    plane.pid, plane.counters = 8, {"diab/1": _stats(1, 0, [1])}
    second = await asyncio.to_thread(scrape)
    assert second[("plinth_serving_inference_requests_total", labels)] == 6


def test_metrics_off_records_nothing_on_the_python_path() -> None:
    metrics = Metrics("serving")
    metrics.enabled = False  # what PLINTH_METRICS=off sets

    async def read() -> MetricsReading:
        return MetricsReading(routed={})

    assert ServingMetrics(metrics, read=read, latency_target_s=lambda d: 0.1).python_path is None


def test_the_latency_target_is_the_inference_latency_slos_threshold(tmp_path: Path) -> None:
    assert latency_targets(None)("any") == 0.1
    path = tmp_path / "slos.yaml"
    path.write_text(
        "inference-latency:\n  threshold_s: 0.2\n  overrides:\n    fraud: {threshold_s: 0.05}\n"
    )
    target = latency_targets(path)
    assert (target("fraud"), target("other")) == (0.05, 0.2)
    path.write_text("inference-latency: {threshold_s: -1}\n")
    with pytest.raises(InvalidArgument):
        latency_targets(path)


def test_server_faults_are_the_data_planes_error_codes() -> None:
    details = RichDetails()
    assert server_fault(UpstreamStatus(grpc.StatusCode.INTERNAL, "boom", details=details))
    assert not server_fault(
        UpstreamStatus(grpc.StatusCode.INVALID_ARGUMENT, "bad tensor", details=details)
    )
    assert server_fault(Unavailable("Triton is down"))
    assert not server_fault(InvalidArgument("inputs.x", "wrong shape"))
    assert not server_fault(NotFound("deployment version", "diab:9"))
    assert server_fault(RuntimeError("a bug"))


async def test_the_gateway_sees_no_restart_when_haproxy_restarts_or_triton_gauges_fall() -> None:
    metrics = Metrics("serving")
    plane = FakePlane(pid=1, counters={"diab/1": _stats(5, 0, [1] * 5)})
    pending = 'nv_inference_pending_request_count{model="diab__v1",version="1"}'
    triton = {"text": TRITON_TEXT.replace(f"{pending} 0", f"{pending} 3")}

    async def read() -> MetricsReading:
        return await read_plane(
            plane,
            {"diab/1": "diab__v1"},
            bounds_ms=LATENCY_BOUNDS_MS,
            latency_target_s=lambda d: 0.1,
        )

    serving = ServingMetrics(
        metrics, read=read, latency_target_s=lambda d: 0.1, triton_metrics_url="http://triton"
    )
    serving.collector._fetch = lambda url: triton["text"]  # no Triton in a unit test
    serving.bind(asyncio.get_running_loop())

    def scrape() -> str:
        return metrics.exposition(openmetrics=False).decode()

    first = parse_exposition(await asyncio.to_thread(scrape))
    assert any(name.endswith("_created") for name, _ in first)
    plane.pid, plane.counters = 2, {"diab/1": _stats(1, 0, [1])}
    triton["text"] = TRITON_TEXT  # the pending requests were answered: 3 -> 0
    second = parse_exposition(await asyncio.to_thread(scrape))
    assert not restarted(first, second)
    key = ("plinth_serving_inference_requests_total", (("deployment", "diab"), ("version", "1")))
    assert (first[key], second[key]) == (5, 6)


async def test_an_exposition_asked_on_the_event_loop_does_not_wait_for_itself() -> None:
    metrics = Metrics("serving")

    async def read() -> MetricsReading:
        raise AssertionError("not read on the loop's own thread")

    serving = ServingMetrics(metrics, read=read, latency_target_s=lambda d: 0.1)
    serving.bind(asyncio.get_running_loop())
    assert serving.python_path is not None
    serving.python_path.record("diab", "1", 0.001, failed=False)
    began = time.monotonic()
    text = metrics.exposition(openmetrics=False).decode()
    assert time.monotonic() - began < 1.0
    assert 'plinth_serving_inference_requests_total{deployment="diab",version="1"} 1.0' in text


async def test_versions_beyond_max_series_fold_into_other() -> None:
    metrics = Metrics("serving")

    async def read() -> MetricsReading:
        return MetricsReading(routed={})

    counts = PythonPathCounts(lambda d: 0.1)
    collector = InferenceCollector(read=read, python_path=counts, max_series=2)
    metrics.registry.register(collector)
    for version in ("1", "2", "3", "4"):
        counts.record("diab", version, 0.001, failed=False)
    text = await asyncio.to_thread(metrics.exposition, openmetrics=False)
    shown = {
        (s.labels["deployment"], s.labels["version"]): s.value
        for f in text_string_to_metric_families(text.decode())
        if f.name == "plinth_serving_inference_requests"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert shown == {("diab", "1"): 1, ("diab", "2"): 1, ("other", "other"): 2}
