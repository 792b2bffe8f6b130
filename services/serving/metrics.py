"""Serving's Prometheus metrics: inference per deployment and version, Triton's own, rollouts.

Inference requests, errors, slow requests and latency (``plinth_serving_inference_*``) come
from the data path. On the data plane nothing runs in Python per request: HAProxy's Lua keeps
per-version counters and latency buckets, and :class:`InferenceCollector` reads them (``plinth
stats`` on its runtime API) when ``/metrics`` is scraped. Those counters restart from zero with
HAProxy; :class:`MonotonicCounts` keeps what a previous HAProxy counted as an offset, so the
exported counters only grow. The Python path (no HAProxy) records each request in
:class:`PythonPathCounts`. Both use the data plane's bucket bounds
(:data:`~plinth_common.metrics.INFERENCE_BUCKETS_S`), so a request is "slow" when it is slower
than the largest bound at most its deployment's latency target (the target itself when it is a
bound, as the 100 ms default is).

Triton's own ``nv_inference_*`` metrics are fetched from its metrics port at the same scrape
and re-exposed with ``deployment`` and ``version`` instead of Triton's ``model`` and
``version``, from serving's own table of which Triton model serves which deployment version
(never by parsing model names); models serving does not route are left out. Triton's counters
keep Triton's names (no ``_total`` is added) and are exposed untyped.

Imports neither grpc nor nats: the data plane and the routes come in as one async reading.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from plinth_common import metrics as catalog
from plinth_common import slo as slo_config
from plinth_common.metrics import INFERENCE_BUCKETS_S, Metrics

__all__ = [
    "InferenceCollector",
    "MetricsReading",
    "MonotonicCounts",
    "PythonPathCounts",
    "ServingMetrics",
    "Tally",
    "fetch_text",
    "latency_targets",
    "read_plane",
    "relabel_triton",
    "tally_from_buckets",
]

log = logging.getLogger(__name__)

#: Bound of one scrape's wait for the event loop (the data plane's counters, the routes).
READ_TIMEOUT_S = 2.0
#: Bound of one fetch of Triton's metrics.
TRITON_TIMEOUT_S = 2.0
#: The SLO whose threshold is a deployment's latency target (``slow_requests_total``).
INFERENCE_LATENCY_SLO = "inference-latency"
DEFAULT_TARGET_S = 0.1
_NV_PREFIX = "nv_inference_"
_WIDTH = len(INFERENCE_BUCKETS_S) + 1  # the last bucket is +Inf


@dataclass
class Tally:
    """One deployment version's cumulative inference figures.

    Attributes:
        requests: answered requests.
        errors: of those, server errors.
        slow: of those, slower than the deployment's latency target.
        sum_s: the sum of their latencies (seconds).
        buckets: requests per latency bucket (bounds ``INFERENCE_BUCKETS_S``, then +Inf), not
            cumulative.
    """

    requests: int = 0
    errors: int = 0
    slow: int = 0
    sum_s: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * _WIDTH)

    def add(self, other: Tally) -> Tally:
        """The sum of both (a new tally)."""
        return Tally(
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            slow=self.slow + other.slow,
            sum_s=self.sum_s + other.sum_s,
            buckets=[a + b for a, b in zip(self.buckets, other.buckets, strict=True)],
        )

    def went_down(self, earlier: Tally) -> bool:
        """True when a counter is below ``earlier``'s (the counting process restarted)."""
        return self.requests < earlier.requests or self.errors < earlier.errors


def _fast_buckets(target_s: float) -> int:
    """How many buckets (from the first) hold requests within ``target_s``."""
    return bisect.bisect_right(INFERENCE_BUCKETS_S, target_s + 1e-12)


def _slow_from(buckets: Sequence[int], target_s: float) -> int:
    """Requests in the buckets above the largest bound at most ``target_s``."""
    return sum(buckets[_fast_buckets(target_s) :])


def tally_from_buckets(
    *,
    requests: int,
    errors: int,
    sum_s: float,
    bounds_s: Sequence[float],
    counts: Sequence[int],
    target_s: float,
) -> Tally:
    """A tally from a counter's latency buckets (``counts`` per ``bounds_s``, then +Inf).

    Buckets of other bounds than :data:`INFERENCE_BUCKETS_S` fold into the catalog bucket
    whose bound is the smallest at least theirs (exact when the bounds are the same).
    """
    buckets = [0] * _WIDTH
    for index, count in enumerate(counts):
        bound = bounds_s[index] if index < len(bounds_s) else float("inf")
        buckets[bisect.bisect_left(INFERENCE_BUCKETS_S, bound - 1e-12)] += int(count)
    return Tally(
        requests=int(requests),
        errors=int(errors),
        slow=_slow_from(buckets, target_s),
        sum_s=float(sum_s),
        buckets=buckets,
    )


class PythonPathCounts:
    """Per-request recording for the Python inference path (thread-safe, a few microseconds).

    Args:
        latency_target_s: deployment -> its latency target (seconds).
    """

    def __init__(self, latency_target_s: Callable[[str], float]) -> None:
        self._target = latency_target_s
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._lock = threading.Lock()

    def record(self, deployment: str, version: str, seconds: float, *, failed: bool) -> None:
        """Counts one answered request (``failed``: a server error)."""
        index = bisect.bisect_left(INFERENCE_BUCKETS_S, seconds)
        # Slow as on the data plane: in a bucket above the largest bound at most the target.
        slow = index >= _fast_buckets(self._target(deployment))
        with self._lock:
            tally = self._tallies.get((deployment, version))
            if tally is None:
                tally = self._tallies[(deployment, version)] = Tally()
            tally.requests += 1
            tally.errors += failed
            tally.slow += slow
            tally.sum_s += seconds
            tally.buckets[index] += 1

    def snapshot(self) -> dict[tuple[str, str], Tally]:
        """A copy of every version's tally."""
        with self._lock:
            return {key: Tally().add(t) for key, t in self._tallies.items()}


class MonotonicCounts:
    """The data plane's counters made monotonic across HAProxy restarts.

    A restart shows as a new HAProxy pid, or as a counter lower than at the last reading;
    what the previous HAProxy counted up to the last reading is then kept as an offset.
    Requests it answered after the last reading and before it ended are not known to anyone.
    """

    def __init__(self) -> None:
        self._offset: dict[tuple[str, str], Tally] = {}
        self._last: dict[tuple[str, str], Tally] = {}
        self._pid: int | None = None
        self._lock = threading.Lock()

    def update(
        self, pid: int | None, current: Mapping[tuple[str, str], Tally]
    ) -> dict[tuple[str, str], Tally]:
        """Takes one reading of HAProxy ``pid``; returns the monotonic totals."""
        with self._lock:
            restarted = self._pid is not None and pid is not None and pid != self._pid
            if restarted or any(
                t.went_down(self._last[k]) for k, t in current.items() if k in self._last
            ):
                self._bank()
            if pid is not None:
                self._pid = pid
            self._last = dict(current)
            return self._totals()

    def totals(self) -> dict[tuple[str, str], Tally]:
        """The totals as of the last reading (when the data plane does not answer now)."""
        with self._lock:
            return self._totals()

    def _bank(self) -> None:
        for key, tally in self._last.items():
            self._offset[key] = self._offset.get(key, Tally()).add(tally)
        self._last = {}

    def _totals(self) -> dict[tuple[str, str], Tally]:
        totals = {key: Tally().add(t) for key, t in self._offset.items()}
        for key, tally in self._last.items():
            totals[key] = totals[key].add(tally) if key in totals else Tally().add(tally)
        return totals


@dataclass(frozen=True)
class MetricsReading:
    """What one scrape reads on the event loop.

    Attributes:
        routed: ``"<deployment>/<version>"`` -> Triton model, of every version routed now.
        proxy_pid: HAProxy's pid (None on the Python path or while it is down).
        proxy: the data plane's per-version tallies, or None when it did not answer.
    """

    routed: Mapping[str, str]
    proxy_pid: int | None = None
    proxy: Mapping[tuple[str, str], Tally] | None = None


class PlaneCounters(Protocol):
    """One version's counters as the data plane reports them (``dataplane.VersionStats``)."""

    @property
    def requests(self) -> int: ...

    @property
    def errors(self) -> int: ...

    @property
    def total_ms(self) -> float: ...

    @property
    def buckets(self) -> tuple[int, ...]: ...


class PlaneStats(Protocol):
    """What a reading needs of the data plane (``dataplane.DataPlane``)."""

    @property
    def pid(self) -> int | None: ...

    async def stats(self) -> Mapping[str, PlaneCounters]: ...


async def read_plane(
    plane: PlaneStats | None,
    routed: Mapping[str, str],
    *,
    bounds_ms: Sequence[float],
    latency_target_s: Callable[[str], float],
) -> MetricsReading:
    """One reading: the routes, and the data plane's counters when it answers.

    Args:
        plane: the data plane (None on the Python path).
        routed: ``"<deployment>/<version>"`` -> Triton model.
        bounds_ms: the data plane's latency bucket bounds (milliseconds; then +Inf).
        latency_target_s: deployment -> its latency target (seconds).
    """
    if plane is None:
        return MetricsReading(routed=routed)
    pid = plane.pid
    try:
        stats = await plane.stats()
    except Exception as exc:  # noqa: BLE001 - down or restarting: the last totals stand
        log.debug("no data plane counters for this scrape: %s", exc)
        return MetricsReading(routed=routed)
    if pid is None or plane.pid != pid:
        return MetricsReading(routed=routed)  # restarted while read: which one answered?
    bounds_s = [b / 1000.0 for b in bounds_ms]
    tallies: dict[tuple[str, str], Tally] = {}
    for key, counters in stats.items():
        # The data plane's own key, "<deployment>/<version>" (a deployment holds no "/").
        deployment, _, version = key.partition("/")
        tallies[(deployment, version)] = tally_from_buckets(
            requests=counters.requests,
            errors=counters.errors,
            sum_s=counters.total_ms / 1000.0,
            bounds_s=bounds_s,
            counts=counters.buckets,
            target_s=latency_target_s(deployment),
        )
    return MetricsReading(routed=routed, proxy_pid=pid, proxy=tallies)


def relabel_triton(text: str, routed: Mapping[str, str]) -> list[Metric]:
    """Triton's ``nv_inference_*`` families with ``deployment``/``version`` labels.

    Args:
        text: Triton's ``/metrics`` (Prometheus text format).
        routed: ``"<deployment>/<version>"`` -> the Triton model serving it.

    A Triton model that serves one routed version is that version; one that serves several
    (Triton versions of one model) is told apart by Triton's ``version`` label. Samples of
    models serving does not route are dropped.
    """
    by_model: dict[str, list[tuple[str, str]]] = {}
    for key, model in routed.items():
        deployment, _, version = key.partition("/")
        by_model.setdefault(model, []).append((deployment, version))
    out: list[Metric] = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(_NV_PREFIX):
            continue
        # The parser names counter samples ``<name>_total``; Triton's have no suffix.
        kind = "unknown" if family.type == "counter" else family.type
        relabelled = Metric(family.name, family.documentation, kind)
        for sample in family.samples:
            labels = dict(sample.labels)
            owner = _owner(by_model.get(labels.pop("model", ""), []), labels.get("version", ""))
            if owner is None:
                continue
            labels["deployment"], labels["version"] = owner
            name = family.name if family.type == "counter" else sample.name
            relabelled.add_sample(name, labels, sample.value)
        if relabelled.samples:
            out.append(relabelled)
    return out


def _owner(candidates: Sequence[tuple[str, str]], triton_version: str) -> tuple[str, str] | None:
    if len(candidates) == 1:
        return candidates[0]
    for deployment, version in candidates:
        if version == triton_version:
            return deployment, version
    return None


def fetch_text(url: str, timeout_s: float = TRITON_TIMEOUT_S) -> str:
    """GET ``url`` as text (blocking; the scrape's own thread)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return str(answer.read().decode("utf-8", "replace"))


class InferenceCollector(Collector):
    """Builds the inference families and Triton's relabelled ones at each scrape.

    Args:
        read: the coroutine that reads the routes and the data plane (run on ``loop``).
        python_path: the Python path's per-request counts.
        triton_metrics_url: Triton's ``/metrics`` ('' when it exports none).
        fetch: how Triton's metrics are fetched (tests may point it elsewhere).
        max_series: deployment versions shown before further ones count as ``other``.
    """

    def __init__(
        self,
        *,
        read: Callable[[], Coroutine[Any, Any, MetricsReading]],
        python_path: PythonPathCounts,
        triton_metrics_url: str = "",
        fetch: Callable[[str], str] = fetch_text,
        max_series: int = 1000,
    ) -> None:
        self._read = read
        self._python_path = python_path
        self._triton_url = triton_metrics_url
        self._fetch = fetch
        self._plane = MonotonicCounts()
        self._created = time.time()
        self._max_series = max_series
        self._shown: set[tuple[str, str]] = set()
        self._warned_overflow = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned: set[str] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that owns the data plane and the routes (set when serving starts)."""
        self._loop = loop

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not read the data plane."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The families of one scrape (called from the metrics endpoint's thread)."""
        reading = self._reading()
        if reading is not None and reading.proxy is not None:
            plane = self._plane.update(reading.proxy_pid, reading.proxy)
        else:
            plane = self._plane.totals()
        totals: dict[tuple[str, str], Tally] = {}
        for version, tally in [*plane.items(), *self._python_path.snapshot().items()]:
            key = self._bounded(version)
            totals[key] = totals[key].add(tally) if key in totals else tally
        yield from _inference_families(totals, self._created)
        if self._triton_url and reading is not None:
            yield from self._triton(reading.routed)

    def _bounded(self, key: tuple[str, str]) -> tuple[str, str]:
        """``key``, or the ``other`` series once ``max_series`` versions are shown (as the
        catalog's families do); a version keeps the series it was first shown under."""
        if key in self._shown:
            return key
        if len(self._shown) >= self._max_series:
            if not self._warned_overflow:
                log.warning(
                    "serving shows %d deployment versions; further ones count as %r",
                    self._max_series,
                    catalog.OVERFLOW,
                )
                self._warned_overflow = True
            return (catalog.OVERFLOW, catalog.OVERFLOW)
        self._shown.add(key)
        return key

    def _reading(self) -> MetricsReading | None:
        loop = self._loop
        if loop is None or loop.is_closed() or _running_loop() is loop:
            # Asked on the loop itself (an in-process exposition()): it cannot wait for itself.
            return None
        future = asyncio.run_coroutine_threadsafe(self._read(), loop)
        try:
            return future.result(timeout=READ_TIMEOUT_S)
        except FutureTimeout:
            future.cancel()
            self._warn_once("loop", "the event loop did not answer a scrape in time")
        except Exception as exc:  # noqa: BLE001 - a scrape shows what it has
            self._warn_once("read", f"cannot read the data plane for a scrape: {exc}")
        return None

    def _triton(self, routed: Mapping[str, str]) -> list[Metric]:
        try:
            text = self._fetch(self._triton_url)
        except OSError as exc:  # Triton restarting: its metrics are missing from this scrape
            self._warn_once("triton", f"cannot read Triton's metrics at {self._triton_url}: {exc}")
            return []
        self._warned.discard("triton")
        return relabel_triton(text, routed)

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            log.warning("%s", message)
            self._warned.add(what)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _inference_families(totals: Mapping[tuple[str, str], Tally], created: float) -> list[Metric]:
    """The four inference families; ``created``: when this process began counting (a scraper
    tells a serving restart from it, as from prometheus-client's own counters)."""
    labels = list(catalog.SERVING_INFERENCE_REQUESTS.labels)
    requests = CounterMetricFamily(
        catalog.SERVING_INFERENCE_REQUESTS.name,
        catalog.SERVING_INFERENCE_REQUESTS.help,
        None,
        labels,
    )
    errors = CounterMetricFamily(
        catalog.SERVING_INFERENCE_ERRORS.name, catalog.SERVING_INFERENCE_ERRORS.help, None, labels
    )
    slow = CounterMetricFamily(
        catalog.SERVING_INFERENCE_SLOW.name, catalog.SERVING_INFERENCE_SLOW.help, None, labels
    )
    duration = HistogramMetricFamily(
        catalog.SERVING_INFERENCE_DURATION.name,
        catalog.SERVING_INFERENCE_DURATION.help,
        labels=labels,
    )
    for (deployment, version), tally in sorted(totals.items()):
        values = [deployment, version]
        requests.add_metric(values, tally.requests, created=created)
        errors.add_metric(values, tally.errors, created=created)
        slow.add_metric(values, tally.slow, created=created)
        cumulative, buckets = 0, []
        for bound, count in zip((*INFERENCE_BUCKETS_S, float("inf")), tally.buckets, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), float(cumulative)))
        duration.add_metric(values, buckets, tally.sum_s)
        duration.add_sample(
            f"{duration.name}_created", dict(zip(labels, values, strict=True)), created
        )
    return [requests, errors, slow, duration]


def latency_targets(slos_file: Path | None) -> Callable[[str], float]:
    """Deployment -> its latency target (seconds): the ``inference-latency`` SLO's threshold
    for it, from the platform's SLO settings (``PLINTH_SLOS_FILE``, the file the gateway reads).

    Raises:
        InvalidArgument: an unreadable file, or settings :func:`plinth_common.slo.configure`
            refuses.
    """
    slos = slo_config.configure({}) if slos_file is None else slo_config.slos_from_file(slos_file)
    slo = next(s for s in slos if s.name == INFERENCE_LATENCY_SLO)
    default = slo.target.threshold_s or DEFAULT_TARGET_S
    overrides = {scope: target.threshold_s or default for scope, target in slo.overrides.items()}
    if not overrides:
        return lambda _deployment: default
    return lambda deployment: overrides.get(deployment, default)


class ServingMetrics:
    """Serving's metrics in the process's registry.

    Args:
        metrics: the process's metrics (``ServiceRuntime.metrics``).
        read: the coroutine that reads the routes and the data plane at a scrape.
        latency_target_s: deployment -> its latency target (seconds).
        triton_metrics_url: Triton's ``/metrics`` ('' when it exports none).
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        read: Callable[[], Coroutine[Any, Any, MetricsReading]],
        latency_target_s: Callable[[str], float],
        triton_metrics_url: str = "",
    ) -> None:
        self._rollouts = metrics.counter(catalog.SERVING_ROLLOUTS)
        counts = PythonPathCounts(latency_target_s)
        self.collector = InferenceCollector(
            read=read, python_path=counts, triton_metrics_url=triton_metrics_url
        )
        #: The Python path's per-request recorder; None with metrics off (``PLINTH_METRICS=off``:
        #: no scrape happens, so nothing is recorded or collected).
        self.python_path: PythonPathCounts | None = None
        if getattr(metrics, "enabled", True):
            self.python_path = counts
            metrics.registry.register(self.collector)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """See :meth:`InferenceCollector.bind`."""
        self.collector.bind(loop)

    def rollout(self, outcome: str) -> None:
        """Counts a rollout's end: ``completed``, ``failed`` or ``rolled_back``."""
        self._rollouts.labels(outcome).inc()
