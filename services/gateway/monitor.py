"""The platform monitor: SLO figures and the weekly report from Plinth's own recorded data.

The gateway scrapes every service's ``/metrics`` every ``interval_s`` (15 s), turns the series the
SLOs and the report need into per-minute deltas (a counter that went down was reset by a restart:
its new value is the delta), stores them (:class:`MonitorStore`: the gateway's database), prunes
what is older than the longest window, and computes :mod:`plinth_common.slo`'s compliance, error
budget and burn rates from them. So the embedded platform shows real numbers without a
Prometheus server; with ``PLINTH_PROMETHEUS_URL`` the SLO counts come from Prometheus instead
(:mod:`services.gateway.prometheus_source`).

Domain only: no grpc, no SQL. The console calls :meth:`PlatformMonitor.status` and
:meth:`PlatformMonitor.report` in-process; the gRPC servicer does the same.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from plinth_common.config import DEFAULT_METRICS_PORTS, Env
from plinth_common.monitoring import SERVER_ERROR_CODES
from plinth_common.slo import (
    BURN_RATE_ALERTS,
    BURN_WINDOWS,
    DEFAULT_SLOS,
    EventCounts,
    EventCountSource,
    Slo,
    SloStatus,
    evaluate_all,
)

log = logging.getLogger(__name__)

MINUTE = timedelta(minutes=1)
#: The longest report period (buckets are kept for the longest SLO window, 28 days by default).
MAX_SINCE = timedelta(days=90)
#: A series: its sample name and its sorted label pairs.
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
#: A per-minute report figure: (figure, key) -> delta; keys join label values with ``|``.
ReportKey = tuple[str, str]

_REQUESTS = "plinth_grpc_server_requests_total"
_DURATION = "plinth_grpc_server_request_duration_seconds"
_QUEUE_WAIT = "plinth_scheduler_queue_wait_seconds"
_INFERENCE = "plinth_serving_inference_request_duration_seconds"

#: Report figures (the ``figure`` of :data:`ReportKey`).
JOBS_FINISHED = "jobs_finished"  # key: team|state
QUEUE_WAIT_BUCKET = "queue_wait_bucket"  # key: team|le
INFERENCE_BUCKET = "inference_bucket"  # key: deployment|le
REGISTRY_CALLS = "registry_calls"  # key: method


@dataclass(frozen=True)
class ScrapeTarget:
    """One service's metrics endpoint.

    Attributes:
        service: the component (gateway, scheduler, ...).
        url: its ``/metrics`` URL.
    """

    service: str
    url: str


def targets_from_env(env: Env, own_metrics_port: int = 0) -> list[ScrapeTarget]:
    """Each service's endpoint: ``PLINTH_<SERVICE>_METRICS_URL``, else the host of
    ``PLINTH_<SERVICE>_ADDR`` (127.0.0.1) and ``PLINTH_<SERVICE>_METRICS_PORT`` (its default).
    The gateway itself is scraped on ``own_metrics_port`` (its bound port; 0: filled in by the
    app). A port of 0 (ephemeral, unknown here) gives an empty URL: shown, never scraped."""
    targets: list[ScrapeTarget] = []
    for service, default in DEFAULT_METRICS_PORTS.items():
        prefix = f"PLINTH_{service.upper()}_"
        url = env.str(prefix + "METRICS_URL", "")
        if not url:
            host = "127.0.0.1"
            if service == "gateway":
                port = own_metrics_port  # its own endpoint: known to the app once bound
            else:
                port = env.int(prefix + "METRICS_PORT", default)
                host = env.str(prefix + "ADDR", "").rpartition(":")[0] or host
                if host in ("0.0.0.0", "[::]"):
                    host = "127.0.0.1"
            url = f"http://{host}:{port}/metrics" if port else ""
        targets.append(ScrapeTarget(service, url))
    return targets


_COUNTERS = ("_total", "_bucket", "_count")


def parse_exposition(text: str) -> dict[SeriesKey, float]:
    """The counter samples of a classic-text scrape (``_total``, ``_bucket``, ``_count``, and
    their ``_created`` times), by series; gauges are left out, and so is every family not
    Plinth's own (serving re-exports Triton's ``nv_inference_*``, whose gauge
    ``nv_inference_pending_request_count`` goes down and would read as a restart)."""
    samples: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("plinth_"):
            continue
        for sample in family.samples:
            if sample.name.endswith((*_COUNTERS, "_created")):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def restarted(previous: Mapping[SeriesKey, float], current: Mapping[SeriesKey, float]) -> bool:
    """Whether the process behind a target restarted between two scrapes: a counter went down
    or a series was created anew."""
    for key, value in current.items():
        before = previous.get(key)
        if before is None:
            continue
        if key[0].endswith("_created") and value != before:
            return True
        if value < before:
            return True
    return False


def counter_deltas(
    previous: Mapping[SeriesKey, float], current: Mapping[SeriesKey, float]
) -> dict[SeriesKey, float]:
    """How much each counter grew since ``previous``. After a restart (:func:`restarted`) every
    value is new, even of a counter that has already grown past its old value; a series not
    seen before is new too."""
    if restarted(previous, current):
        previous = {}
    deltas: dict[SeriesKey, float] = {}
    for key, value in current.items():
        if key[0].endswith("_created"):
            continue
        delta = value - previous.get(key, 0.0)
        if delta > 0:
            deltas[key] = delta
    return deltas


def _le_at_most(threshold: float, les: Iterable[str]) -> str | None:
    """The largest bucket bound not above ``threshold`` (a good event is at most it)."""
    best: tuple[float, str] | None = None
    for le in les:
        bound = float(le)
        if bound <= threshold + 1e-12 and (best is None or bound > best[0]):
            best = (bound, le)
    return best[1] if best else None


@dataclass
class _Tally:
    good: float = 0.0
    total: float = 0.0


def sli_increments(
    service: str, deltas: Mapping[SeriesKey, float], slos: Sequence[Slo]
) -> dict[tuple[str, str], tuple[int, int]]:
    """(SLO, scope) -> (good, total) events among one target's deltas (the same selections as
    the Prometheus rules of :mod:`plinth_common.monitoring`)."""
    by_name = {slo.name: slo for slo in slos}
    tallies: dict[tuple[str, str], _Tally] = defaultdict(_Tally)
    buckets: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for (name, pairs), delta in deltas.items():
        labels = dict(pairs)
        if service == "gateway" and name == _REQUESTS and "gateway-availability" in by_name:
            if labels.get("service", "").startswith("grpc."):
                continue  # health and reflection: the orchestrator's calls, not the users'
            tally = tallies[("gateway-availability", "")]
            tally.total += delta
            if labels.get("code") not in SERVER_ERROR_CODES:
                tally.good += delta
        elif service == "registry" and name.startswith(_DURATION):
            if labels.get("method") != "GetModelVersionByAlias":
                continue
            if name == _DURATION + "_bucket":
                buckets[("registry-alias-latency", "")][labels["le"]] = delta
            elif name == _DURATION + "_count":
                tallies[("registry-alias-latency", "")].total += delta
        elif service == "scheduler" and name == _QUEUE_WAIT + "_bucket":
            buckets[("queue-wait", labels.get("team", ""))].setdefault(labels["le"], 0.0)
            buckets[("queue-wait", labels.get("team", ""))][labels["le"]] += delta
        elif service == "scheduler" and name == _QUEUE_WAIT + "_count":
            tallies[("queue-wait", labels.get("team", ""))].total += delta
        elif service == "scheduler" and name == "plinth_scheduler_job_starts_total":
            tally = tallies[("job-start-success", "")]
            tally.total += delta
            if labels.get("result") != "failed":
                tally.good += delta
        elif service == "serving" and name.startswith("plinth_serving_inference_"):
            deployment = labels.get("deployment", "")
            if name == "plinth_serving_inference_requests_total":
                for slo_name in ("inference-availability", "inference-latency"):
                    tallies[(slo_name, deployment)].total += delta
                    tallies[(slo_name, deployment)].good += delta
            elif name == "plinth_serving_inference_errors_total":
                tallies[("inference-availability", deployment)].good -= delta
            elif name == "plinth_serving_inference_slow_requests_total":
                tallies[("inference-latency", deployment)].good -= delta
    # Histogram SLIs: good events are the bucket at the scope's threshold (cumulative counts).
    for (slo_name, scope), by_le in buckets.items():
        slo = by_name.get(slo_name)
        threshold = slo.target_for(scope).threshold_s if slo else None
        le = _le_at_most(threshold, by_le) if threshold is not None else None
        if le is not None:
            tallies[(slo_name, scope)].good += by_le[le]
    result: dict[tuple[str, str], tuple[int, int]] = {}
    for key, tally in tallies.items():
        if key[0] not in by_name:
            continue
        total = round(tally.total)
        good = min(max(round(tally.good), 0), total)
        if total:
            result[key] = (good, total)
    return result


def report_increments(service: str, deltas: Mapping[SeriesKey, float]) -> dict[ReportKey, float]:
    """The report's figures among one target's deltas."""
    found: dict[ReportKey, float] = defaultdict(float)
    for (name, pairs), delta in deltas.items():
        labels = dict(pairs)
        if service == "scheduler" and name == "plinth_scheduler_jobs_finished_total":
            found[(JOBS_FINISHED, f"{labels.get('team', '')}|{labels.get('state', '')}")] += delta
        elif service == "scheduler" and name == _QUEUE_WAIT + "_bucket":
            found[(QUEUE_WAIT_BUCKET, f"{labels.get('team', '')}|{labels['le']}")] += delta
        elif service == "serving" and name == _INFERENCE + "_bucket":
            key = f"{labels.get('deployment', '')}|{labels['le']}"
            found[(INFERENCE_BUCKET, key)] += delta
        elif (
            service == "registry"
            and name == _REQUESTS
            and labels.get("service", "").startswith("plinth.registry.")
        ):
            found[(REGISTRY_CALLS, labels.get("method", ""))] += delta
    return dict(found)


def histogram_quantile(q: float, buckets: Mapping[str, float]) -> float | None:
    """Prometheus's ``histogram_quantile`` over cumulative bucket counts by ``le``: linear
    within the bucket the rank falls in; the highest finite bound when it falls in ``+Inf``;
    None without observations."""
    ordered = sorted(((float(le), count) for le, count in buckets.items()), key=lambda b: b[0])
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


class MonitorStore(Protocol):
    """Where the per-minute buckets live (:class:`services.gateway.monitor_store.SqlMonitorStore`)."""

    async def add(
        self,
        minute: datetime,
        slis: Mapping[tuple[str, str], tuple[int, int]],
        figures: Mapping[ReportKey, float],
    ) -> None:
        """Adds one scrape's increments to the buckets of ``minute``."""
        ...

    async def slo_counts(
        self, slo: str, start: datetime, end: datetime
    ) -> dict[str, list[EventCounts]]:
        """The buckets of ``slo`` starting in ``[start, end)``, per scope, oldest first."""
        ...

    async def figure_sums(self, figure: str, start: datetime, end: datetime) -> dict[str, float]:
        """The sum of a report figure's buckets in ``[start, end)``, per key."""
        ...

    async def prune(self, before: datetime) -> int:
        """Deletes buckets that start before ``before``; returns how many."""
        ...


class StoredCounts:
    """An :class:`EventCountSource` over the monitor's stored buckets."""

    def __init__(self, store: MonitorStore) -> None:
        self._store = store

    async def event_counts(
        self, slo: Slo, start: datetime, end: datetime
    ) -> Mapping[str, Sequence[EventCounts]]:
        """The stored buckets of ``slo`` in ``[start, end)``, per scope."""
        return await self._store.slo_counts(slo.name, start, end)


Fetch = Callable[[str], Awaitable[str]]


@dataclass
class ComponentHealth:
    """What the monitor knows of one component.

    Attributes:
        name: the component.
        metrics_url: where it is scraped ("" when its port is unknown).
        up: its last scrape answered.
        error: why the last scrape failed.
        last_scrape: when it last answered.
        state: the supervisor's state of its process (``running``, ``backoff``...; "" without
            a supervisor).
        restarts: restarts the supervisor counted.
    """

    name: str
    metrics_url: str = ""
    up: bool = False
    error: str = ""
    last_scrape: datetime | None = None
    state: str = ""
    restarts: int = 0


@dataclass
class PlatformStatus:
    """The platform at a glance: components and every SLO scope's figures."""

    now: datetime
    components: list[ComponentHealth]
    slos: list[SloStatus]
    source: str  # "recorded" or "prometheus"


@dataclass
class TeamJobs:
    """One team's finished jobs in the report's period."""

    team: str
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def success_rate(self) -> float | None:
        """Succeeded / (succeeded + failed); cancellations are the user's choice."""
        ended = self.succeeded + self.failed
        return self.succeeded / ended if ended else None


@dataclass
class Report:
    """The weekly review: jobs, queue waits, endpoint latency, registry volume."""

    since: datetime
    until: datetime
    team: str
    jobs: list[TeamJobs] = field(default_factory=list)
    #: team -> (p50, p90) seconds, None without admissions.
    queue_wait: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    #: deployment -> p99 seconds.
    endpoint_p99: dict[str, float | None] = field(default_factory=dict)
    #: registry method -> calls.
    registry_calls: dict[str, int] = field(default_factory=dict)


async def http_fetch(session: aiohttp.ClientSession, url: str, timeout_s: float) -> str:
    """GET ``url`` (classic text format) or raise."""
    async with session.get(
        url, timeout=aiohttp.ClientTimeout(total=timeout_s), headers={"Accept": "text/plain"}
    ) as response:
        response.raise_for_status()
        return await response.text()


class PlatformMonitor:
    """Scrapes, stores and evaluates; the source of ``GetPlatformStatus`` and ``GetReport``.

    Args:
        targets: the endpoints to scrape (or a callable giving them, for the gateway's own port
            known only once bound).
        store: the per-minute buckets.
        slos: the SLOs in force.
        interval_s: time between scrapes.
        counts: where SLO counts come from (default: ``store``; Prometheus when configured).
        supervisor_status: the launcher's status file reader (restarts), or None.
        fetch: GET a URL's text (default: aiohttp).
        clock: now, in UTC.
    """

    def __init__(
        self,
        targets: Sequence[ScrapeTarget] | Callable[[], Sequence[ScrapeTarget]],
        store: MonitorStore,
        *,
        slos: Sequence[Slo] = DEFAULT_SLOS,
        interval_s: float = 15.0,
        counts: EventCountSource | None = None,
        source_name: str = "recorded",
        supervisor_status: Callable[[], dict[str, Any] | None] | None = None,
        fetch: Fetch | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        timeout_s: float = 5.0,
    ) -> None:
        self._targets = targets
        self.store = store
        self.slos = tuple(slos)
        self.interval_s = interval_s
        self.counts: EventCountSource = counts or StoredCounts(store)
        self.source_name = source_name
        self._supervisor_status = supervisor_status
        self._fetch = fetch
        self._clock = clock
        self._timeout_s = timeout_s
        self._previous: dict[str, dict[SeriesKey, float]] = {}
        self._health: dict[str, ComponentHealth] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        longest = max(
            [slo.window for slo in self.slos]
            + [a.long for a in BURN_RATE_ALERTS]
            + list(BURN_WINDOWS.values())
        )
        self.retention = longest + MINUTE

    def targets(self) -> list[ScrapeTarget]:
        """The endpoints scraped."""
        targets = self._targets() if callable(self._targets) else self._targets
        return list(targets)

    async def _get(self, url: str) -> str:
        if self._fetch is not None:
            return await self._fetch(url)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return await http_fetch(self._session, url, self._timeout_s)

    async def scrape_once(self) -> None:
        """Scrapes every target once and stores the increments in the current minute's bucket.

        A target's first scrape only sets its baseline (the counts before it belong to no
        known minute); a target that stops answering keeps its baseline, so its counts after
        it comes back are not lost (or, if it restarted meanwhile, counted from zero).
        """
        async with self._lock:
            now = self._clock()
            minute = now.replace(second=0, microsecond=0)
            slis: dict[tuple[str, str], tuple[int, int]] = {}
            figures: dict[ReportKey, float] = defaultdict(float)
            for target in self.targets():
                health = self._health.setdefault(
                    target.service, ComponentHealth(target.service, target.url)
                )
                health.metrics_url = target.url
                if not target.url:
                    health.up, health.error = False, "metrics port unknown"
                    continue
                try:
                    current = parse_exposition(await self._get(target.url))
                except Exception as exc:  # noqa: BLE001 - any failure: the component is down
                    health.up, health.error = False, str(exc) or type(exc).__name__
                    continue
                health.up, health.error, health.last_scrape = True, "", now
                previous = self._previous.get(target.url)
                self._previous[target.url] = current
                if previous is None:
                    continue
                deltas = counter_deltas(previous, current)
                for key, (good, total) in sli_increments(target.service, deltas, self.slos).items():
                    old_good, old_total = slis.get(key, (0, 0))
                    slis[key] = (old_good + good, old_total + total)
                for key, value in report_increments(target.service, deltas).items():
                    figures[key] += value
            if slis or figures:
                await self.store.add(minute, slis, dict(figures))

    async def prune(self) -> int:
        """Drops buckets older than the longest window."""
        return await self.store.prune(self._clock() - self.retention)

    async def _loop(self) -> None:
        ticks = 0
        while True:
            try:
                await self.scrape_once()
                if ticks % 240 == 0:  # about hourly at 15 s
                    await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("platform monitor: scrape failed")
            ticks += 1
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        """Starts scraping every ``interval_s`` (0: never; this replica only reads the buckets
        another one writes)."""
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="platform-monitor")

    async def stop(self) -> None:
        """Stops scraping and closes the HTTP session."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with _suppress_cancel():
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def components(self) -> list[ComponentHealth]:
        """Every component's health and (with a supervisor) restarts."""
        supervised = (self._supervisor_status() if self._supervisor_status else None) or {}
        services: Mapping[str, Any] = supervised.get("services", {}) or {}
        names = [t.service for t in self.targets()]
        names += [name for name in services if name not in names]
        result: list[ComponentHealth] = []
        for name in names:
            health = self._health.get(name, ComponentHealth(name))
            entry = services.get(name) or {}
            result.append(
                ComponentHealth(
                    name=name,
                    metrics_url=health.metrics_url,
                    up=health.up,
                    error=health.error if health.last_scrape or health.error else "not scraped yet",
                    last_scrape=health.last_scrape,
                    state=str(entry.get("state", "")),
                    restarts=int(entry.get("restarts", 0) or 0),
                )
            )
        return result

    async def status(self, *, teams: Iterable[str] | None = None) -> PlatformStatus:
        """Components and SLO figures now; ``teams`` limits per-team scopes (None: all)."""
        now = self._clock()
        statuses = await evaluate_all(self.slos, self.counts, now)
        if teams is not None:
            allowed = set(teams)
            statuses = [s for s in statuses if s.slo.per != "team" or s.scope in allowed]
        # An SLO without any event yet still shows, as "no data", so the table is complete.
        seen = {s.slo.name for s in statuses}
        for slo in self.slos:
            if slo.name not in seen and not slo.per:
                statuses.append(_empty(slo))
        statuses.sort(key=lambda s: ([x.name for x in self.slos].index(s.slo.name), s.scope))
        return PlatformStatus(
            now=now, components=self.components(), slos=statuses, source=self.source_name
        )

    async def report(
        self, since: timedelta, *, team: str = "", teams: Iterable[str] | None = None
    ) -> Report:
        """The review of the last ``since``: for ``team`` only when given; else for ``teams``
        (None: every team). Endpoint and registry figures are platform-wide."""
        until = self._clock()
        start = until - since
        allowed = {team} if team else (set(teams) if teams is not None else None)

        def shown(name: str) -> bool:
            return allowed is None or name in allowed

        report = Report(since=start, until=until, team=team)
        jobs: dict[str, TeamJobs] = {}
        for key, value in (await self.store.figure_sums(JOBS_FINISHED, start, until)).items():
            name, _, state = key.partition("|")
            if not shown(name):
                continue
            row = jobs.setdefault(name, TeamJobs(name))
            if state == "succeeded":
                row.succeeded += round(value)
            elif state == "failed":
                row.failed += round(value)
            elif state == "cancelled":
                row.cancelled += round(value)
        report.jobs = [jobs[name] for name in sorted(jobs)]
        waits: dict[str, dict[str, float]] = defaultdict(dict)
        for key, value in (await self.store.figure_sums(QUEUE_WAIT_BUCKET, start, until)).items():
            name, _, le = key.partition("|")
            if shown(name):
                waits[name][le] = value
        report.queue_wait = {
            name: (histogram_quantile(0.5, b), histogram_quantile(0.9, b))
            for name, b in sorted(waits.items())
        }
        latency: dict[str, dict[str, float]] = defaultdict(dict)
        for key, value in (await self.store.figure_sums(INFERENCE_BUCKET, start, until)).items():
            name, _, le = key.partition("|")
            latency[name][le] = value
        report.endpoint_p99 = {
            name: histogram_quantile(0.99, b) for name, b in sorted(latency.items())
        }
        calls = await self.store.figure_sums(REGISTRY_CALLS, start, until)
        report.registry_calls = {m: round(v) for m, v in sorted(calls.items()) if round(v)}
        return report


def _empty(slo: Slo) -> SloStatus:
    return SloStatus(
        slo=slo,
        scope="",
        target=slo.target,
        good=0,
        total=0,
        compliance=None,
        budget_remaining=1.0,
        burn_rates=dict.fromkeys(BURN_WINDOWS),
        alerts=(),
    )


class _suppress_cancel:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is asyncio.CancelledError


def parse_since(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m`` -> a timedelta.

    Raises:
        ValueError: not a number followed by d, h or m.
    """
    units = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}
    text = text.strip()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise ValueError(f"{text!r} is not a duration like 7d, 12h or 30m")
    since = int(text[:-1][:9]) * units[text[-1]]
    if len(text) > 10 or since > MAX_SINCE:
        raise ValueError(
            f"at most {MAX_SINCE.days}d (the buckets are kept that long), got {text!r}"
        )
    return since
