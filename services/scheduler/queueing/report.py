"""The queue anyone can read: usage against quota per cluster queue, and for every pending job
its position, why it waits (a sentence with numbers) and when it should start.

Built by :meth:`services.scheduler.queueing.engine.QueueEngine.report`; pure data here, plus
the sentences' helpers. Estimates come from a simulation (see the engine's module docstring):
running jobs end at ``admitted_at + expected run time``, pending jobs start in admission order as
capacity frees; a job whose start depends on a job with no known run time has no estimate, and
its ``estimate_basis`` names that job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

__all__ = [
    "PendingWorkload",
    "QueueReport",
    "QueueStatus",
    "ResourceUsage",
    "plural",
]


@dataclass(frozen=True, kw_only=True)
class ResourceUsage:
    """One resource of one flavor of a cluster queue.

    Attributes:
        flavor: the flavor.
        resource: ``cpu`` (cores), ``memory`` (bytes) or ``gpu`` (devices).
        nominal: the queue's nominal quota.
        usage: what its admitted jobs hold.
        borrowed: usage above nominal (taken from the cohort).
        lent: the part of this queue's unused quota that other queues of the cohort use (the
            cohort's borrowing shared among its lenders in proportion to what each leaves
            unused, up to its lending limit).
        borrowing_limit: None: as much as the cohort lends.
        lending_limit: None: all of the nominal quota.
    """

    flavor: str
    resource: str
    nominal: float
    usage: float
    borrowed: float
    lent: float
    borrowing_limit: float | None = None
    lending_limit: float | None = None


@dataclass(frozen=True, kw_only=True)
class QueueStatus:
    """A cluster queue as its teams see it.

    Attributes:
        name: the cluster queue.
        cohort: its cohort ('' for none).
        teams: the teams that submit to it (empty for the default queue of unlisted teams).
        resources: per flavor (in the queue's order) and resource.
        pending: jobs waiting.
        admitted: jobs holding quota (running or starting).
        fair_weight: its weight in the cohort's fair share.
        dominant_share: its current weighted dominant share (usage over the cohort's nominal
            total of the resource it uses most, divided by the weight).
    """

    name: str
    cohort: str
    teams: tuple[str, ...]
    resources: tuple[ResourceUsage, ...]
    pending: int
    admitted: int
    fair_weight: float = 1.0
    dominant_share: float = 0.0


class PendingWorkload(NamedTuple):
    """One pending job (a named tuple: a report holds thousands, built in one call).

    Attributes:
        job_id: the job.
        team: its team.
        queue: its cluster queue.
        priority: its priority value.
        position_in_queue: 1-based, in the queue's order (priority, then order).
        position_in_cohort: 1-based over the cohort's pending jobs in predicted admission order
            (the queue alone when it has no cohort).
        reason: why it is not admitted, as a sentence with numbers.
        estimated_start: None when unknown (``estimate_basis`` says why).
        estimate_basis: how the estimate was made, as a sentence.
    """

    job_id: str
    team: str
    queue: str
    priority: int
    position_in_queue: int
    position_in_cohort: int
    reason: str
    estimated_start: datetime | None
    estimate_basis: str


@dataclass(frozen=True, kw_only=True)
class QueueReport:
    """The queues and their pending jobs at ``generated_at``.

    Attributes:
        generated_at: the time the report describes.
        queues: cluster queues, by name.
        pending: pending jobs, by queue then position in queue.
    """

    generated_at: datetime
    queues: tuple[QueueStatus, ...]
    pending: tuple[PendingWorkload, ...]
    _by_id: dict[str, PendingWorkload] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {p.job_id: p for p in self.pending})

    def pending_of(self, job_id: str) -> PendingWorkload | None:
        """The entry of one pending job (None if it is not pending or not in the report)."""
        return self._by_id.get(job_id)

    def queue(self, name: str) -> QueueStatus | None:
        """One cluster queue's status (None if not in the report)."""
        return next((q for q in self.queues if q.name == name), None)


def plural(count: int, noun: str) -> str:
    """``1 job``, ``2 jobs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
