"""Prometheus metrics, one way for every service.

Each process builds one :class:`Metrics`: its own ``CollectorRegistry`` (never the global default
one, so tests and in-process stacks that run several services do not collide), the families it
declares from :data:`CATALOG` (the one list of metric names, also printed in the README), and an
HTTP endpoint (``/metrics``) on the service's metrics port. Scrapes that accept OpenMetrics (as
Prometheus does) get it, with exemplars carrying the current trace id on histograms; others get
the classic text format.

Labels are bounded twice: the catalog declares which labels a metric has (never ids), and each
family keeps at most ``max_series`` label sets; further sets fold into one whose values are all
``other``, so a bug that labels by job id costs one series, not one per job.

Metrics can be switched off per process (``PLINTH_METRICS=off``, read into
``CommonSettings.metrics_enabled``): a ``Metrics(..., enabled=False)`` binds no endpoint, its
families hand out a child that records nothing, and the gRPC server skips its per-call figures.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]

#: Request latencies (seconds): fine below 100 ms, where the SLO thresholds are (50 ms, 100 ms).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Inference latencies (seconds): the inference data plane's own bucket bounds
#: (``services.serving.dataplane.tables.LATENCY_BOUNDS_MS``), so that serving re-exports the
#: proxy's counts exactly; 0.1 (the inference-latency SLO's 100 ms) is one of them.
INFERENCE_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
#: Event publish-to-handle lag (seconds).
LAG_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
#: Queue waits (seconds), with 600 (the queue-wait SLO's 10 minutes) as a boundary.
QUEUE_WAIT_BUCKETS_S: tuple[float, ...] = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
    86400.0,
)
#: Job run times (seconds): a minute to a week.
RUN_TIME_BUCKETS_S: tuple[float, ...] = (
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
    259200.0,
    604800.0,
)

#: The label value every series beyond a family's ``max_series`` folds into.
OVERFLOW = "other"
#: Label names that would be unbounded (one series per object): never allowed.
UNBOUNDED_LABELS = frozenset(
    {
        "id",
        "job",
        "job_id",
        "run_id",
        "trace_id",
        "span_id",
        "request_id",
        "user",
        "key",
        "event_id",
    }
)

_NAME = re.compile(r"^plinth_[a-z][a-z0-9_]*[a-z0-9]$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
_UNITS = ("_seconds", "_bytes", "_ratio")


@dataclass(frozen=True, kw_only=True)
class MetricSpec:
    """One metric of the catalog.

    Attributes:
        name: the exposed name (counters end in ``_total``).
        kind: counter, gauge or histogram.
        help: what it means, one line (also the README's text).
        labels: its label names, each of bounded cardinality.
        buckets: histogram bucket upper bounds, in the metric's base unit.
        exported_by: which process exports it (``every service``, ``scheduler``, ...).
        wired: False while the catalog declares it but its service does not record it yet.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    exported_by: str = "every service"
    wired: bool = True

    def problems(self) -> list[str]:
        """What breaks the Prometheus naming conventions (empty when nothing does)."""
        found: list[str] = []
        if not _NAME.match(self.name):
            found.append(f"{self.name}: not plinth_ + snake_case")
        if self.kind == "counter" and not self.name.endswith("_total"):
            found.append(f"{self.name}: a counter's name ends in _total")
        if self.kind != "counter" and self.name.endswith("_total"):
            found.append(f"{self.name}: only counters end in _total")
        if self.kind == "histogram":
            if not self.name.endswith(_UNITS):
                found.append(f"{self.name}: a histogram names its base unit (_seconds, _bytes)")
            if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
                found.append(f"{self.name}: buckets must be increasing")
        elif self.buckets:
            found.append(f"{self.name}: only histograms have buckets")
        for unit in ("_milliseconds", "_ms", "_minutes", "_hours", "_kilobytes", "_megabytes"):
            if unit in self.name:
                found.append(f"{self.name}: use base units (seconds, bytes), not {unit[1:]}")
        for label in self.labels:
            if not _LABEL.match(label) or label == "le":
                found.append(f"{self.name}: bad label name {label!r}")
            if label in UNBOUNDED_LABELS:
                found.append(f"{self.name}: {label!r} is an unbounded label")
        return found


def _spec(*args: MetricSpec) -> dict[str, MetricSpec]:
    return {s.name: s for s in args}


GRPC_SERVER_REQUESTS = MetricSpec(
    name="plinth_grpc_server_requests_total",
    kind="counter",
    help="gRPC calls handled, by service, method and status code (streams count at their end).",
    labels=("service", "method", "code"),
)
GRPC_SERVER_DURATION = MetricSpec(
    name="plinth_grpc_server_request_duration_seconds",
    kind="histogram",
    help="Time to handle a unary gRPC call, from its arrival to its status.",
    labels=("service", "method"),
    buckets=LATENCY_BUCKETS_S,
)
EVENTS_PUBLISHED = MetricSpec(
    name="plinth_events_published_total",
    kind="counter",
    help="Events the outbox relay published to JetStream (acknowledged), by subject.",
    labels=("subject",),
)
EVENTS_OUTBOX_BACKLOG = MetricSpec(
    name="plinth_events_outbox_backlog",
    kind="gauge",
    help="Committed outbox events not yet published (grows while NATS is unreachable).",
)
EVENTS_HANDLE_LAG = MetricSpec(
    name="plinth_events_handle_lag_seconds",
    kind="histogram",
    help="From an event's CloudEvents time (its producer's commit) to its handling, by subject.",
    labels=("subject",),
    buckets=LAG_BUCKETS_S,
)
EVENTS_REDELIVERIES = MetricSpec(
    name="plinth_events_redeliveries_total",
    kind="counter",
    help="Event deliveries that were not the first of their message, by consumer.",
    labels=("consumer",),
)
EVENTS_DEAD_LETTERS = MetricSpec(
    name="plinth_events_dead_letters_total",
    kind="counter",
    help="Events moved to the dead-letter stream, by consumer.",
    labels=("consumer",),
)

# Declared here so that names, labels and buckets are fixed before the services record them
# (issue 11, second part): the SLO rules and the dashboard already use them.
SCHEDULER_JOBS_SUBMITTED = MetricSpec(
    name="plinth_scheduler_jobs_submitted_total",
    kind="counter",
    help="Jobs submitted, by team and queue.",
    labels=("team", "queue"),
    exported_by="scheduler",
)
SCHEDULER_JOBS_ADMITTED = MetricSpec(
    name="plinth_scheduler_jobs_admitted_total",
    kind="counter",
    help="Jobs admitted by their queue (quota reserved), by team, queue and executor.",
    labels=("team", "queue", "executor"),
    exported_by="scheduler",
)
SCHEDULER_JOBS_FINISHED = MetricSpec(
    name="plinth_scheduler_jobs_finished_total",
    kind="counter",
    help="Jobs that reached a final state (succeeded, failed, cancelled), by team and executor.",
    labels=("team", "executor", "state"),
    exported_by="scheduler",
)
SCHEDULER_JOB_STARTS = MetricSpec(
    name="plinth_scheduler_job_starts_total",
    kind="counter",
    help=(
        "Attempts to start a job on its executor, by result: started, or failed for a platform"
        " reason (never the user's exit code)."
    ),
    labels=("team", "executor", "result"),
    exported_by="scheduler",
)
SCHEDULER_QUEUE_WAIT = MetricSpec(
    name="plinth_scheduler_queue_wait_seconds",
    kind="histogram",
    help="Time from submission (or requeue) to admission, by team and queue.",
    labels=("team", "queue"),
    buckets=QUEUE_WAIT_BUCKETS_S,
    exported_by="scheduler",
)
SCHEDULER_JOB_RUN_DURATION = MetricSpec(
    name="plinth_scheduler_job_run_duration_seconds",
    kind="histogram",
    help="Run time of finished attempts, by team and queue.",
    labels=("team", "queue"),
    buckets=RUN_TIME_BUCKETS_S,
    exported_by="scheduler",
)
SCHEDULER_PENDING_JOBS = MetricSpec(
    name="plinth_scheduler_pending_jobs",
    kind="gauge",
    help=(
        "Jobs waiting for admission, by queue and reason class (quota, cohort, priority,"
        " backoff, executor, ready, other)."
    ),
    labels=("queue", "reason"),
    exported_by="scheduler",
)
SCHEDULER_QUOTA_USED = MetricSpec(
    name="plinth_scheduler_quota_used",
    kind="gauge",
    help=(
        "Resources admitted jobs hold, by queue, flavor and resource (cpu cores, memory bytes,"
        " gpus)."
    ),
    labels=("queue", "flavor", "resource"),
    exported_by="scheduler",
)
SCHEDULER_QUOTA_NOMINAL = MetricSpec(
    name="plinth_scheduler_quota_nominal",
    kind="gauge",
    help=(
        "A queue's nominal quota, by flavor and resource, in the same units as"
        " plinth_scheduler_quota_used."
    ),
    labels=("queue", "flavor", "resource"),
    exported_by="scheduler",
)
SCHEDULER_QUOTA_BORROWED = MetricSpec(
    name="plinth_scheduler_quota_borrowed",
    kind="gauge",
    help="What a queue holds beyond its nominal quota, borrowed from its cohort, by flavor and resource.",
    labels=("queue", "flavor", "resource"),
    exported_by="scheduler",
)
SCHEDULER_PREEMPTIONS = MetricSpec(
    name="plinth_scheduler_preemptions_total",
    kind="counter",
    help=(
        "Running jobs preempted (and requeued), by team, queue and source: the scheduler's"
        " admission, or the executor's engine (a SLURM preemption, a Kueue eviction)."
    ),
    labels=("team", "queue", "source"),
    exported_by="scheduler",
)
SCHEDULER_RETRIES = MetricSpec(
    name="plinth_scheduler_retries_total",
    kind="counter",
    help="Failed attempts retried after their backoff, by team, queue and failure kind.",
    labels=("team", "queue", "kind"),
    exported_by="scheduler",
)
REGISTRY_PROMOTIONS = MetricSpec(
    name="plinth_registry_promotions_total",
    kind="counter",
    help="Alias promotions requested, by team and outcome (promoted, refused, awaiting_approval).",
    labels=("team", "outcome"),
    exported_by="registry",
)
SERVING_ROLLOUTS = MetricSpec(
    name="plinth_serving_rollouts_total",
    kind="counter",
    help=(
        "Rollouts of a new version to a deployment, by outcome (completed; failed: it did not"
        " load; rolled_back: its canaries were given back to the serving version)."
    ),
    labels=("outcome",),
    exported_by="serving",
)
SERVING_INFERENCE_REQUESTS = MetricSpec(
    name="plinth_serving_inference_requests_total",
    kind="counter",
    help=(
        "Inference requests answered on the data path (the data plane's and the Python path's),"
        " by deployment and version."
    ),
    labels=("deployment", "version"),
    exported_by="serving",
)
SERVING_INFERENCE_ERRORS = MetricSpec(
    name="plinth_serving_inference_errors_total",
    kind="counter",
    help="Inference requests that failed for a server reason (5xx, UNAVAILABLE, INTERNAL).",
    labels=("deployment", "version"),
    exported_by="serving",
)
SERVING_INFERENCE_SLOW = MetricSpec(
    name="plinth_serving_inference_slow_requests_total",
    kind="counter",
    help="Inference requests slower than their deployment's latency target (the latency SLI).",
    labels=("deployment", "version"),
    exported_by="serving",
)
SERVING_INFERENCE_DURATION = MetricSpec(
    name="plinth_serving_inference_request_duration_seconds",
    kind="histogram",
    help="Inference latency on the data path, by deployment and version.",
    labels=("deployment", "version"),
    buckets=INFERENCE_BUCKETS_S,
    exported_by="serving",
)
FEATURES_ONLINE_READ_DURATION = MetricSpec(
    name="plinth_features_online_read_duration_seconds",
    kind="histogram",
    help="Online feature read latency, by feature view.",
    labels=("feature_view",),
    buckets=LATENCY_BUCKETS_S,
    exported_by="features",
)
FEATURES_FRESHNESS = MetricSpec(
    name="plinth_features_freshness_seconds",
    kind="gauge",
    help="Age of a feature view's newest materialized data.",
    labels=("feature_view",),
    exported_by="features",
)

#: Every metric Plinth exports, by name; the README's metric list is this.
CATALOG: dict[str, MetricSpec] = _spec(
    GRPC_SERVER_REQUESTS,
    GRPC_SERVER_DURATION,
    EVENTS_PUBLISHED,
    EVENTS_OUTBOX_BACKLOG,
    EVENTS_HANDLE_LAG,
    EVENTS_REDELIVERIES,
    EVENTS_DEAD_LETTERS,
    SCHEDULER_JOBS_SUBMITTED,
    SCHEDULER_JOBS_ADMITTED,
    SCHEDULER_JOBS_FINISHED,
    SCHEDULER_JOB_STARTS,
    SCHEDULER_QUEUE_WAIT,
    SCHEDULER_JOB_RUN_DURATION,
    SCHEDULER_PENDING_JOBS,
    SCHEDULER_QUOTA_USED,
    SCHEDULER_QUOTA_NOMINAL,
    SCHEDULER_QUOTA_BORROWED,
    SCHEDULER_PREEMPTIONS,
    SCHEDULER_RETRIES,
    REGISTRY_PROMOTIONS,
    SERVING_ROLLOUTS,
    SERVING_INFERENCE_REQUESTS,
    SERVING_INFERENCE_ERRORS,
    SERVING_INFERENCE_SLOW,
    SERVING_INFERENCE_DURATION,
    FEATURES_ONLINE_READ_DURATION,
    FEATURES_FRESHNESS,
)


def exposed_names(spec: MetricSpec) -> list[str]:
    """The sample names a scrape shows for ``spec`` (a histogram's ``_bucket``, ``_sum``, ...)."""
    if spec.kind == "histogram":
        return [f"{spec.name}_{suffix}" for suffix in ("bucket", "sum", "count", "created")]
    if spec.kind == "counter":
        return [spec.name, spec.name.removesuffix("_total") + "_created"]
    return [spec.name]


def current_trace_exemplar() -> dict[str, str] | None:
    """``{"trace_id": ...}`` of the current sampled span, or None outside one."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": format(ctx.trace_id, "032x")}


M = TypeVar("M", Counter, Gauge, Histogram)


class _Unrecorded:
    """What a family hands out while metrics are off: every recording call does nothing."""

    def labels(self, *values: str) -> _Unrecorded:
        return self

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def set_function(self, f: Callable[[], float]) -> None:
        pass

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        pass


_UNRECORDED = _Unrecorded()


class Family(Generic[M]):
    """One declared metric and its label sets, at most ``max_series`` of them.

    Args:
        metric: the prometheus-client metric.
        spec: its catalog entry.
        max_series: label sets kept before new ones fold into the ``other`` set.
        enabled: False when metrics are off: :meth:`labels` then hands out a child that
            records nothing.
    """

    def __init__(self, metric: M, spec: MetricSpec, max_series: int, enabled: bool = True) -> None:
        self.metric: M = metric
        self.spec = spec
        self._max_series = max_series
        self._enabled = enabled
        self._children: dict[tuple[str, ...], M] = {}
        self._lock = threading.Lock()
        self._warned = False

    def labels(self, *values: str) -> M:
        """The child for ``values`` (in the spec's label order); the metric itself without labels."""
        child = self._children.get(values)
        if child is not None:
            return child
        if not self._enabled:  # checked after the lookup, so recording pays nothing for it
            return cast(M, _UNRECORDED)
        if not self.spec.labels:
            return self.metric
        if len(values) != len(self.spec.labels):
            raise ValueError(f"{self.spec.name} takes labels {self.spec.labels}, got {values}")
        with self._lock:
            if len(self._children) >= self._max_series:
                if not self._warned:
                    log.warning(
                        "%s has %d label sets; further ones count as %r",
                        self.spec.name,
                        self._max_series,
                        OVERFLOW,
                    )
                    self._warned = True
                values = (OVERFLOW,) * len(self.spec.labels)
                child = self._children.get(values)
                if child is not None:
                    return child
            child = cast(M, self.metric.labels(*values))
            self._children[values] = child
            return child

    def remove(self, *values: str) -> None:
        """Drops the series for ``values`` (a deleted object's), so a scrape no longer shows it;
        a later :meth:`labels` with the same values starts it anew."""
        with self._lock, warnings.catch_warnings():
            # Importing feast.metrics sets PROMETHEUS_MULTIPROC_DIR for Feast's own server, and
            # prometheus-client then warns on every removal; this registry is in-process.
            warnings.filterwarnings("ignore", "Removal of labels", UserWarning)
            if self._children.pop(values, None) is not None:
                self.metric.remove(*values)

    @property
    def series(self) -> int:
        """How many label sets this family holds."""
        return len(self._children)


def observe(histogram: Histogram, value: float) -> None:
    """Observes ``value`` with the current trace id as its exemplar (when inside a sampled span)."""
    histogram.observe(value, exemplar=current_trace_exemplar())


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server4(ThreadingWSGIServer):
    address_family = socket.AF_INET


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class Metrics:
    """The metrics of one service process: a private registry, its families, its endpoint.

    Args:
        service: the service's name (logs, the endpoint's thread name).
        max_series: label sets kept per family (see :class:`Family`).
        enabled: False switches metrics off: nothing is recorded and :meth:`serve` binds no
            port (``PLINTH_METRICS=off``).
    """

    def __init__(self, service: str, *, max_series: int = 1000, enabled: bool = True) -> None:
        self.service = service
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        self._max_series = max_series
        self._families: dict[str, Family[Any]] = {}
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def _declare(self, spec: MetricSpec, kind: Kind) -> Family[M]:
        known = CATALOG.get(spec.name)
        if known != spec:
            raise ValueError(f"{spec.name} is not in the metrics catalog (plinth_common.metrics)")
        if spec.kind != kind:
            raise ValueError(f"{spec.name} is a {spec.kind}, not a {kind}")
        family = self._families.get(spec.name)
        if family is None:
            metric: Counter | Gauge | Histogram
            if kind == "counter":
                metric = Counter(spec.name, spec.help, spec.labels, registry=self.registry)
            elif kind == "gauge":
                metric = Gauge(spec.name, spec.help, spec.labels, registry=self.registry)
            else:
                metric = Histogram(
                    spec.name, spec.help, spec.labels, registry=self.registry, buckets=spec.buckets
                )
            family = Family[Any](metric, spec, self._max_series, self.enabled)
            self._families[spec.name] = family
        return cast(Family[M], family)

    def counter(self, spec: MetricSpec) -> Family[Counter]:
        """Declares (or returns the already declared) counter ``spec``."""
        return self._declare(spec, "counter")

    def gauge(self, spec: MetricSpec) -> Family[Gauge]:
        """Declares (or returns the already declared) gauge ``spec``."""
        return self._declare(spec, "gauge")

    def histogram(self, spec: MetricSpec) -> Family[Histogram]:
        """Declares (or returns the already declared) histogram ``spec``."""
        return self._declare(spec, "histogram")

    def declared(self) -> Iterable[MetricSpec]:
        """The specs declared so far."""
        return [family.spec for family in self._families.values()]

    def exposition(self, *, openmetrics: bool = True) -> bytes:
        """What a scrape returns: OpenMetrics (with exemplars) or the classic text format."""
        if openmetrics:
            return cast(bytes, generate_openmetrics(self.registry))
        return cast(bytes, generate_latest(self.registry))

    async def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint (``/metrics``) on ``host:port``; returns the bound port.

        It answers from a thread of its own, so a scrape does not wait for the event loop and a
        busy loop does not delay a scrape. With metrics off it binds nothing and returns 0.
        """
        if not self.enabled:
            log.info("%s metrics off (PLINTH_METRICS=off): no endpoint", self.service)
            return 0
        server_class = _Server6 if ":" in host else _Server4
        httpd = await asyncio.to_thread(
            make_server,
            host,
            port,
            make_wsgi_app(self.registry),
            server_class,
            handler_class=_QuietHandler,
        )
        # A short poll, so that stopping a service does not wait half a second for the thread.
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"metrics-{self.service}",
            daemon=True,
        )
        thread.start()
        self._httpd, self._thread = httpd, thread
        self.port = int(httpd.server_port)
        log.info("%s metrics on http://%s:%d/metrics", self.service, host, self.port)
        return self.port

    async def close(self) -> None:
        """Stops the HTTP endpoint (a no-op when it never started)."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return

        def shut() -> None:
            httpd.shutdown()
            httpd.server_close()
            if thread is not None:
                thread.join(timeout=5)

        await asyncio.to_thread(shut)


def markdown_table() -> str:
    """The README's metric list: every catalog metric, its type, labels and meaning."""
    rows = [
        "| Metric | Type | Labels | Exported by | Meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in CATALOG.values():
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        where = (
            spec.exported_by if spec.wired else f"{spec.exported_by} (declared; not yet recorded)"
        )
        rows.append(f"| `{spec.name}` | {spec.kind} | {labels} | {where} | {spec.help} |")
    return "\n".join(rows)
