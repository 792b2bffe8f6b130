"""The scheduler's Prometheus metrics: what its committed life-cycle events and its queue
report say, recorded through the catalog of :mod:`plinth_common.metrics`.

Counters follow the events the service commits (a transaction that rolled back counts
nothing); gauges are set from the admission engine's report each dispatch pass. Labels are
bounded: team, queue, flavor, executor kind, state, and a reason *class* (never a job id or a
sentence).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from plinth_common import metrics as catalog
from plinth_common.metrics import Metrics, observe
from services.scheduler.domain import JobEvent, JobEventKind, JobState
from services.scheduler.queueing.report import QueueReport

__all__ = ["PENDING_REASONS", "SchedulerMetrics", "pending_reason_class"]

#: The values of ``plinth_scheduler_pending_jobs``'s ``reason`` label.
PENDING_REASONS = ("quota", "cohort", "priority", "backoff", "executor", "ready", "other")

_RESOURCES = ("cpu", "memory", "gpu")


def pending_reason_class(reason: str) -> str:
    """The class of a pending reason sentence (one of :data:`PENDING_REASONS`)."""
    if reason.startswith("executor ") and " unreachable" in reason:
        return "executor"
    if reason.startswith("retrying after backoff"):
        return "backoff"
    if reason.startswith("fits now: admitted"):
        return "ready"
    if reason.startswith("fits now, but waits behind") or "preempted job" in reason:
        return "priority"
    if reason.startswith("waiting for"):
        # "..., the cohort has X to lend": the queue is past its own quota and the cohort
        # cannot lend the rest; otherwise the queue's own quota (or limit) is what is short.
        return "cohort" if "the cohort has" in reason else "quota"
    return "other"


def _state_label(state: JobState) -> str:
    return state.value.lower()


class SchedulerMetrics:
    """Records the scheduler's metrics in ``metrics`` (the process's registry).

    Args:
        metrics: the service process's metrics (``ServiceRuntime.metrics``).
    """

    def __init__(self, metrics: Metrics) -> None:
        #: False with ``PLINTH_METRICS=off``: the gauges' queue report is then not built at all.
        self.enabled = metrics.enabled
        self._submitted = metrics.counter(catalog.SCHEDULER_JOBS_SUBMITTED)
        self._admitted = metrics.counter(catalog.SCHEDULER_JOBS_ADMITTED)
        self._finished = metrics.counter(catalog.SCHEDULER_JOBS_FINISHED)
        self._starts = metrics.counter(catalog.SCHEDULER_JOB_STARTS)
        self._retries = metrics.counter(catalog.SCHEDULER_RETRIES)
        self._preemptions = metrics.counter(catalog.SCHEDULER_PREEMPTIONS)
        self._wait = metrics.histogram(catalog.SCHEDULER_QUEUE_WAIT)
        self._run = metrics.histogram(catalog.SCHEDULER_JOB_RUN_DURATION)
        self._pending = metrics.gauge(catalog.SCHEDULER_PENDING_JOBS)
        self._used = metrics.gauge(catalog.SCHEDULER_QUOTA_USED)
        self._nominal = metrics.gauge(catalog.SCHEDULER_QUOTA_NOMINAL)
        self._borrowed = metrics.gauge(catalog.SCHEDULER_QUOTA_BORROWED)
        self._pending_seen: set[tuple[str, str]] = set()

    def committed(self, events: Iterable[JobEvent], executor_of: Mapping[str, str]) -> None:
        """Counts the events of a committed transaction.

        Args:
            events: what the transaction emitted.
            executor_of: flavor name -> executor kind (a job without a flavor ran locally).
        """
        for event in events:
            job = event.job
            executor = executor_of.get(job.flavor, "local") if job.flavor else "local"
            kind = event.kind
            if kind is JobEventKind.SUBMITTED:
                self._submitted.labels(job.team, job.queue).inc()
            elif kind is JobEventKind.ADMITTED:
                self._admitted.labels(job.team, job.queue, executor).inc()
                since = job.queued_at or job.created_at
                if job.admitted_at is not None:
                    wait = max(0.0, (job.admitted_at - since).total_seconds())
                    observe(self._wait.labels(job.team, job.queue), wait)
            elif kind is JobEventKind.STARTED:
                self._starts.labels(job.team, executor, "started").inc()
            elif kind in (JobEventKind.FINISHED, JobEventKind.CANCELLED):
                self._finished.labels(job.team, executor, _state_label(job.state)).inc()
            elif kind is JobEventKind.RETRYING:
                self._retries.labels(job.team, job.queue, event.failure_kind or "user").inc()
            elif kind is JobEventKind.PREEMPTED:
                self._preemptions.labels(job.team, job.queue, "scheduler").inc()

    def preempted_by_executor(self, team: str, queue: str) -> None:
        """Counts a preemption the engine reported (SLURM, a Kueue eviction)."""
        self._preemptions.labels(team, queue, "executor").inc()

    def start_failed(self, team: str, executor: str) -> None:
        """Counts a start that failed for a platform reason (not the job's own mistake)."""
        self._starts.labels(team, executor, "failed").inc()

    def attempt_ran(
        self, team: str, queue: str, started_at: datetime | None, ended_at: datetime
    ) -> None:
        """Observes an ended attempt's run time (nothing for one that never started)."""
        if started_at is None:
            return
        seconds = max(0.0, (ended_at - started_at).total_seconds())
        observe(self._run.labels(team, queue), seconds)

    def report(self, report: QueueReport, overrides: Mapping[str, str]) -> None:
        """Sets the gauges from the engine's report.

        Args:
            report: the engine's report of this pass.
            overrides: job id -> the pending reason the service shows instead of the engine's
                (a job whose executor is unreachable).
        """
        counts: dict[tuple[str, str], int] = {}
        for queue in report.queues:
            for reason in PENDING_REASONS:
                counts[(queue.name, reason)] = 0
        for entry in report.pending:
            reason = overrides.get(entry.job_id, entry.reason)
            key = (entry.queue, pending_reason_class(reason))
            counts[key] = counts.get(key, 0) + 1
        for key in self._pending_seen - set(counts):
            self._pending.labels(*key).set(0)  # a queue that left the configuration
        for key, count in counts.items():
            self._pending.labels(*key).set(count)
        self._pending_seen = set(counts)
        for queue in report.queues:
            for usage in queue.resources:
                if usage.resource not in _RESOURCES:
                    continue
                labels = (queue.name, usage.flavor, usage.resource)
                self._used.labels(*labels).set(usage.usage)
                self._nominal.labels(*labels).set(usage.nominal)
                self._borrowed.labels(*labels).set(usage.borrowed)
