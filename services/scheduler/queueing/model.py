"""The queueing model in Kueue's vocabulary: resource flavors, cluster queues, cohorts, quotas,
priority classes, and the workloads admission reasons about.

Pure data: no I/O. :mod:`services.scheduler.queueing.config` builds a :class:`QueueConfig` from
the admin's file and validates it; :mod:`services.scheduler.queueing.engine` admits and preempts
:class:`Workload` s against it.

Resources are named ``cpu`` (cores, fractional), ``memory`` (bytes) and ``gpu`` (devices). A
quota or request that does not name a resource has none of it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "RESOURCE_NAMES",
    "Admission",
    "ClusterQueue",
    "Cohort",
    "FlavorQuotas",
    "PreemptionPolicy",
    "PreemptionRules",
    "PriorityClass",
    "QueueConfig",
    "ResourceFlavor",
    "ResourceQuota",
    "Taint",
    "Workload",
]

#: The resources a job asks for and a quota limits (memory in bytes, cpu in cores).
RESOURCE_NAMES = ("cpu", "memory", "gpu")


@dataclass(frozen=True, kw_only=True)
class Taint:
    """A node taint of a flavor; an executor turns it into a toleration of the job's pods."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True, kw_only=True)
class ResourceFlavor:
    """A named class of capacity (``cpu``, ``gpu-a100``, ``spot``).

    Attributes:
        name: DNS label.
        labels: node labels; an executor turns them into a node selector.
        taints: node taints; an executor turns them into tolerations.
        executor: which executor runs jobs admitted to this flavor (``local`` today).
        executor_options: engine address and the like, the executor's to read.
        spot: capacity that the engine may take back (its losses are infrastructure failures).
    """

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    executor: str = "local"
    executor_options: Mapping[str, str] = field(default_factory=dict)
    spot: bool = False


@dataclass(frozen=True, kw_only=True)
class ResourceQuota:
    """One resource's quota of one flavor in one cluster queue.

    Attributes:
        nominal: what the queue is guaranteed.
        borrowing_limit: how much above ``nominal`` it may borrow from its cohort (None: as
            much as the cohort can lend).
        lending_limit: how much of its unused ``nominal`` the cohort may borrow (None: all of
            it).
    """

    nominal: float
    borrowing_limit: float | None = None
    lending_limit: float | None = None


@dataclass(frozen=True, kw_only=True)
class FlavorQuotas:
    """A cluster queue's quotas in one flavor, per resource name."""

    flavor: str
    resources: Mapping[str, ResourceQuota]


class PreemptionPolicy(enum.StrEnum):
    """Whom a pending workload may preempt (Kueue's ``Never``, ``LowerPriority``, ``Any``)."""

    NEVER = "never"
    LOWER_PRIORITY = "lower_priority"
    ANY = "any"


@dataclass(frozen=True, kw_only=True)
class PreemptionRules:
    """A cluster queue's preemption settings.

    Attributes:
        within_queue: a pending workload that fits the queue's nominal quota may preempt
            admitted workloads of the same queue (by priority, per the policy).
        reclaim_within_cohort: a queue below its nominal quota may preempt other queues'
            workloads that borrow from the cohort, to take its lent quota back.
    """

    within_queue: PreemptionPolicy = PreemptionPolicy.LOWER_PRIORITY
    reclaim_within_cohort: PreemptionPolicy = PreemptionPolicy.ANY


@dataclass(frozen=True, kw_only=True)
class ClusterQueue:
    """Quotas per flavor for the teams that submit to it.

    Attributes:
        name: DNS label.
        teams: the teams whose jobs queue here (each team is in at most one queue).
        flavors: quotas per flavor, in order of preference (a workload takes the first flavor
            it fits in).
        cohort: the cohort whose members borrow each other's unused quota ('' for none).
        preemption: who may be preempted for this queue's workloads.
        fair_weight: this queue's weight in its cohort's dominant-resource fair share.
        default_priority: the priority class of a job that names none.
    """

    name: str
    teams: tuple[str, ...] = ()
    flavors: tuple[FlavorQuotas, ...] = ()
    cohort: str = ""
    preemption: PreemptionRules = field(default_factory=PreemptionRules)
    fair_weight: float = 1.0
    default_priority: str = "normal"


@dataclass(frozen=True, kw_only=True)
class Cohort:
    """A group of cluster queues that share unused quota; ``parent`` nests cohorts (a tree).

    Cluster queues anywhere under the same root cohort borrow from each other.
    """

    name: str
    parent: str = ""


@dataclass(frozen=True, kw_only=True)
class PriorityClass:
    """A named priority (Kueue's ``WorkloadPriorityClass``): higher values go first."""

    name: str
    value: int
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class QueueConfig:
    """The whole admin configuration, validated (see :func:`config.parse_config`).

    Attributes:
        flavors: by name.
        cluster_queues: by name.
        cohorts: by name (cohorts named by queues but not declared exist implicitly, as roots).
        priority_classes: by name.
        default_queue: where the jobs of a team in no queue go ('' : such a team cannot
            submit).
        version: the stored version of this configuration (0 for the built-in default).
    """

    flavors: Mapping[str, ResourceFlavor]
    cluster_queues: Mapping[str, ClusterQueue]
    cohorts: Mapping[str, Cohort] = field(default_factory=dict)
    priority_classes: Mapping[str, PriorityClass] = field(default_factory=dict)
    default_queue: str = ""
    version: int = 0


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What admission knows of one job.

    Attributes:
        id: the job id.
        team: the owning team.
        queue: the cluster queue it is in.
        priority: the priority class's value.
        request: per replica, by resource name.
        replicas: workers admitted together, all or nothing (gang).
        order: queue order within equal priority (submission, or retry time: see the README's
            requeue rule); smaller goes first.
        expected_runtime_s: declared maximum run time, or the team's history for jobs of the
            same name; None when unknown (then nothing may be backfilled ahead of it on its
            account, and estimates behind it say so).
        runtime_basis: how ``expected_runtime_s`` was found, in words ("declared maximum run
            time", "median of the last 7 runs of train").
        runtime_bound_s: the longest it is expected to run, which backfill ahead of a blocked
            head relies on (a job backfilled on a typical run time that then runs long would
            delay the head): the declared, enforced maximum run time, or the longest of the
            history. None: ``expected_runtime_s`` is taken as the bound.
        not_before: no admission before this time (a retry's backoff).
    """

    id: str
    team: str
    queue: str
    priority: int
    request: Mapping[str, float]
    replicas: int = 1
    order: float = 0.0
    expected_runtime_s: float | None = None
    runtime_basis: str = ""
    not_before: datetime | None = None
    runtime_bound_s: float | None = None

    def total(self) -> dict[str, float]:
        """The request of all replicas together."""
        return {name: amount * self.replicas for name, amount in self.request.items()}


@dataclass(frozen=True, kw_only=True)
class Admission:
    """An admitted (quota-holding) workload and where: the flavor it holds quota in.

    ``admitted_at`` with ``workload.expected_runtime_s`` gives the expected end that estimates
    and backfill use.
    """

    workload: Workload
    flavor: str
    admitted_at: datetime
