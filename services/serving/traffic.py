"""What the inference data plane measured, per deployment version, and the guard that rolls a
canary back when it breaks its deployment's SLO.

The data plane reports cumulative counters per ``"<deployment>/<version>"`` (requests, errors,
latency buckets). :class:`TrafficWindows` keeps timestamped samples of them, so that
rates over any window up to the longest SLO window are differences of two samples (a counter
that went down, after the proxy restarted, starts the window afresh). :func:`breach` is the
pure verdict; :class:`CanaryGuard` polls the data plane, keeps the windows, and asks the
reconciler to roll back each canary that breaches.

Imports neither grpc nor nats nor sqlalchemy: the data plane and the reconciler come in
through the constructor.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from services.serving.domain import MAX_SLO_WINDOW_S, Slo

log = logging.getLogger(__name__)

#: Fewest requests in the window before a canary is judged (fewer say nothing yet).
MIN_REQUESTS = 20
#: Least share of its SLO window a canary's observed window must span before it is judged: a
#: few slow or failed requests in its first seconds (a cold model) are no verdict.
MIN_WINDOW_FRACTION = 0.5


class VersionCounters(Protocol):
    """One version's numbers as the data plane reports them (``dataplane.VersionStats``)."""

    @property
    def requests(self) -> int: ...

    @property
    def errors(self) -> int: ...

    @property
    def p99_ms(self) -> float: ...


class StatsSource(Protocol):
    """The data plane's statistics, keyed ``"<deployment>/<version>"``."""

    async def stats(self) -> Mapping[str, VersionCounters]: ...


@dataclass(frozen=True, kw_only=True)
class WindowStats:
    """A version's traffic over a window.

    Attributes:
        seconds: how long the window really is (shorter while samples are young).
        requests: requests answered in it.
        errors: of those, errors (the data plane's count: server errors, not refusals).
        p99_ms: the 99th percentile latency of those requests (ms).
    """

    seconds: float
    requests: int
    errors: int
    p99_ms: float

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate_pct(self) -> float:
        """Errors per 100 requests."""
        return 100.0 * self.errors / self.requests if self.requests else 0.0


def breach(stats: WindowStats, slo: Slo, *, min_requests: int = MIN_REQUESTS) -> str | None:
    """Why ``stats`` breaks ``slo`` ('error rate 12.5% over 60s > SLO 1%'), or None when it
    does not (or the window holds too few requests to say)."""
    if stats.requests < min_requests:
        return None
    span = f"over {stats.seconds:.0f}s ({stats.requests} requests)"
    if stats.error_rate_pct > slo.max_error_rate_pct:
        return f"error rate {stats.error_rate_pct:.1f}% {span} > SLO {slo.max_error_rate_pct:g}%"
    if stats.p99_ms > slo.max_p99_ms:
        return f"p99 {stats.p99_ms:.0f} ms {span} > SLO {slo.max_p99_ms:g} ms"
    return None


@dataclass(frozen=True)
class _Sample:
    at: float
    requests: int
    errors: int
    p99_ms: float
    raw: VersionCounters


def _p99_between(first: _Sample, last: _Sample) -> float:
    """The p99 of the requests between two samples: from the difference of their latency
    buckets when the data plane reports them (``VersionStats.since``), else the latest p99."""
    if last.requests <= first.requests:
        return 0.0
    since = getattr(last.raw, "since", None)
    p99 = since(first.raw).p99_ms if since is not None else last.p99_ms
    return 0.0 if math.isnan(p99) else float(p99)


class TrafficWindows:
    """Timestamped samples of every version's counters, kept for ``keep_s`` seconds."""

    def __init__(self, keep_s: float = MAX_SLO_WINDOW_S) -> None:
        self._keep_s = keep_s
        self._samples: dict[str, deque[_Sample]] = {}

    def observe(self, now: float, stats: Mapping[str, VersionCounters]) -> None:
        """Records one reading of the data plane (keys it no longer reports are dropped)."""
        for key in set(self._samples) - set(stats):
            del self._samples[key]
        for key, s in stats.items():
            samples = self._samples.setdefault(key, deque())
            if samples and (s.requests < samples[-1].requests or s.errors < samples[-1].errors):
                samples.clear()  # the counters restarted (the proxy did)
            samples.append(_Sample(now, int(s.requests), int(s.errors), float(s.p99_ms), s))
            while len(samples) > 2 and now - samples[1].at >= self._keep_s:
                samples.popleft()

    def window(self, key: str, seconds: float, now: float, *, since: float = 0.0) -> WindowStats:
        """``key``'s traffic over the last ``seconds`` (and not before ``since``)."""
        samples = self._samples.get(key)
        if not samples:
            return WindowStats(seconds=0.0, requests=0, errors=0, p99_ms=0.0)
        start = max(now - seconds, since)
        first = samples[0]
        for sample in samples:
            if sample.at > start:
                break
            first = sample
        last = samples[-1]
        requests = last.requests - first.requests
        # Merged counters take the larger request count of the data plane and Triton, read a
        # moment apart: a sample can hold Triton's count of requests the data plane records only
        # once answered, so a window may show a few more errors than requests (seen: 100.1%).
        errors = min(last.errors - first.errors, requests)
        return WindowStats(
            seconds=last.at - first.at,
            requests=requests,
            errors=errors,
            p99_ms=_p99_between(first, last),
        )

    def measured(self, key: str) -> bool:
        """True once ``key`` has been read from the data plane."""
        return key in self._samples


@dataclass(frozen=True)
class MergedCounters:
    """One version's counters from the data plane and the model server together: the larger
    of each (both only grow), the data plane's latency buckets for the p99."""

    requests: int
    errors: int
    p99_ms: float
    proxy: VersionCounters | None = None

    def since(self, earlier: MergedCounters) -> VersionCounters:
        """The requests between ``earlier`` and this (for a window's p99)."""
        mine, theirs = self.proxy, earlier.proxy
        since = getattr(mine, "since", None)
        if since is not None and theirs is not None:
            counted: VersionCounters = since(theirs)
            return counted
        return MergedCounters(
            requests=self.requests - earlier.requests,
            errors=self.errors - earlier.errors,
            p99_ms=self.p99_ms,
        )


class EngineCounts(Protocol):
    """The model server's own per-model counters (Triton's statistics)."""

    async def statistics(self, model: str) -> tuple[int, int]:
        """(answered, failed) requests of Triton model ``model``."""
        ...


class MergedStats:
    """A :class:`StatsSource` reading both the data plane (when there is one) and Triton's own
    per-model counters, so that the Python inference path is measured too.

    Errors come from the data plane whenever it reports the version (it counts server errors,
    trailers included, and not the client's: a bad tensor is INVALID_ARGUMENT). Triton's
    ``fail`` counts every failed request, a request it refused as malformed too, so callers
    sending wrong tensors to a canary would roll it back: it is used only where the data plane
    has no numbers (the Python path).

    Args:
        proxy: the data plane (None: the Python path only).
        engine: Triton's statistics.
        models: ``"<deployment>/<version>"`` -> Triton model, of every routed version now.
    """

    def __init__(
        self,
        *,
        proxy: StatsSource | None,
        engine: EngineCounts,
        models: Callable[[], Mapping[str, str]],
    ) -> None:
        self._proxy = proxy
        self._engine = engine
        self._models = models
        self._proxy_failing = False

    async def stats(self) -> dict[str, MergedCounters]:
        """Per ``"<deployment>/<version>"``: the larger counts of the two, the proxy's p99."""
        proxied: Mapping[str, VersionCounters] = {}
        if self._proxy is not None:
            try:
                proxied = await self._proxy.stats()
            except Exception as exc:  # noqa: BLE001 - restarting, or never started: Triton's count
                if not self._proxy_failing:
                    log.warning("no data plane statistics (%s); Triton's counters only", exc)
                self._proxy_failing = True
            else:
                self._proxy_failing = False
        routed = dict(self._models())
        counts = await asyncio.gather(*(self._engine.statistics(m) for m in routed.values()))
        merged: dict[str, MergedCounters] = {}
        for key, (answered, failed) in zip(routed, counts, strict=True):
            seen = proxied.get(key)
            requests = max(answered + failed, seen.requests if seen else 0)
            errors = seen.errors if seen is not None else failed
            p99 = float(seen.p99_ms) if seen is not None else 0.0
            merged[key] = MergedCounters(requests, errors, p99, seen)
        for key, seen in proxied.items():
            if key not in merged:
                merged[key] = MergedCounters(seen.requests, seen.errors, float(seen.p99_ms), seen)
        return merged


class Canaries(Protocol):
    """What the guard needs of the reconciler."""

    def canaried(self) -> dict[str, tuple[Slo, tuple[str, ...]]]:
        """Deployments serving canaries: their SLO and canary versions."""
        ...

    async def roll_back(self, name: str, reason: str) -> bool:
        """Gives the canaries' share back to the serving version."""
        ...


class CanaryGuard:
    """Polls the data plane's statistics and rolls back every canary that breaks its SLO.

    Args:
        stats: the data plane.
        canaries: the reconciler.
        interval_s: pause between readings.
        min_requests: fewest requests in a window before a canary is judged.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        *,
        stats: StatsSource,
        canaries: Canaries,
        interval_s: float = 1.0,
        min_requests: int = MIN_REQUESTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stats = stats
        self._canaries = canaries
        self._interval_s = interval_s
        self._min_requests = min_requests
        self._clock = clock
        self.windows = TrafficWindows()
        # "<deployment>/<version>" -> when the guard first saw it as a canary: what it
        # answered before (as a canary of an earlier split, or the stable one) is not judged.
        self._since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        #: Rollbacks done (deployment, reason), oldest first.
        self.rollbacks: list[tuple[str, str]] = []

    async def start(self) -> None:
        """Starts polling in the background."""
        self._task = asyncio.create_task(self._run(), name="serving-canary-guard")

    async def stop(self) -> None:
        """Stops polling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. the database during a rollback: logged, tried again
                log.exception("the canary guard's check failed")
            await asyncio.sleep(self._interval_s)

    async def check_once(self) -> list[str]:
        """One reading and verdict; returns the deployments rolled back."""
        try:
            stats = await self._stats.stats()
        except Exception as exc:  # noqa: BLE001 - the data plane may be restarting
            if not self._failing:
                log.warning("cannot read the data plane's statistics: %s", exc)
            self._failing = True
            return []
        self._failing = False
        now = self._clock()
        self.windows.observe(now, stats)
        rolled: list[str] = []
        canaried = self._canaries.canaried()
        current = {f"{name}/{v}" for name, (_, versions) in canaried.items() for v in versions}
        for key in set(self._since) - current:
            del self._since[key]
        for name, (slo, versions) in canaried.items():
            for version in versions:
                key = f"{name}/{version}"
                since = self._since.setdefault(key, now)
                window = self.windows.window(key, slo.window_s, now, since=since)
                if window.seconds < slo.window_s * MIN_WINDOW_FRACTION:
                    continue
                reason = breach(window, slo, min_requests=self._min_requests)
                if reason is None:
                    continue
                if await self._canaries.roll_back(name, f"canary v{version} {reason}"):
                    self.rollbacks.append((name, reason))
                    rolled.append(name)
                break  # every canary of the deployment went back together
        return rolled

    def view(self, name: str, version: str, window_s: float) -> WindowStats | None:
        """``version`` of ``name`` over the last ``window_s``; None when never measured."""
        key = f"{name}/{version}"
        if not self.windows.measured(key):
            return None
        return self.windows.window(key, window_s, self._clock())
