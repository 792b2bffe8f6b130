"""Configs, workloads, and an independent check of the quota rules, for the engine's tests.

The checks recompute usage from the admissions alone (not from the engine's books), so a test
fails if the engine's incremental arithmetic drifts from the rules in its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from services.scheduler.queueing.config import parse_config
from services.scheduler.queueing.engine import Decisions, QueueEngine
from services.scheduler.queueing.model import (
    RESOURCE_NAMES,
    Admission,
    QueueConfig,
    Workload,
)
from services.scheduler.queueing.report import PendingWorkload, QueueReport, QueueStatus

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EPS = 1e-6


def at(seconds: float) -> datetime:
    """T0 plus some seconds."""
    return T0 + timedelta(seconds=seconds)


def queue_doc(
    name: str,
    *,
    cohort: str = "",
    flavors: Mapping[str, Mapping[str, Any]] | None = None,
    weight: float = 1,
    within: str = "lower_priority",
    reclaim: str = "any",
    teams: Iterable[str] | None = None,
) -> dict[str, Any]:
    """A cluster queue document; ``flavors`` maps a flavor to its resources' quota documents."""
    doc: dict[str, Any] = {
        "name": name,
        "teams": list(teams) if teams is not None else [name],
        "fair_weight": weight,
        "preemption": {"within_queue": within, "reclaim_within_cohort": reclaim},
        "flavors": [
            {"flavor": f, "resources": dict(r)}
            for f, r in (flavors or {"f": {"cpu": {"nominal": 4}}}).items()
        ],
    }
    if cohort:
        doc["cohort"] = cohort
    return doc


def config(*queues: dict[str, Any], flavors: Iterable[str] = ("f",), **extra: Any) -> QueueConfig:
    """A parsed configuration of these queues."""
    return parse_config(
        {"flavors": [{"name": f} for f in flavors], "cluster_queues": list(queues), **extra}
    )


def job(
    job_id: str,
    queue: str,
    *,
    cpu: float = 1,
    gpu: float = 0,
    memory: float = 0,
    priority: int = 500,
    order: float | None = None,
    runtime: float | None = None,
    replicas: int = 1,
    team: str | None = None,
    not_before: datetime | None = None,
) -> Workload:
    """A workload (order defaults to the number in its id, so j-3 comes before j-10)."""
    digits = "".join(c for c in job_id if c.isdigit())
    return Workload(
        id=job_id,
        team=team or queue,
        queue=queue,
        priority=priority,
        request={"cpu": cpu, "gpu": gpu, "memory": memory},
        replicas=replicas,
        order=float(digits or 0) if order is None else order,
        expected_runtime_s=runtime,
        runtime_basis="declared maximum run time" if runtime is not None else "",
        not_before=not_before,
    )


def row(report: QueueReport, job_id: str) -> PendingWorkload:
    """A pending job's row (it must be there)."""
    found = report.pending_of(job_id)
    assert found is not None, f"{job_id} is not pending in the report"
    return found


def status(report: QueueReport, name: str) -> QueueStatus:
    """A queue's status (it must be there)."""
    found = report.queue(name)
    assert found is not None, f"queue {name} is not in the report"
    return found


def root_of(config: QueueConfig, cohort: str) -> str:
    """The root of a cohort's tree."""
    seen: set[str] = set()
    while cohort in config.cohorts and config.cohorts[cohort].parent and cohort not in seen:
        seen.add(cohort)
        cohort = config.cohorts[cohort].parent
    return cohort


def usage_of(admissions: Iterable[Admission]) -> dict[tuple[str, str, str], float]:
    """(queue, flavor, resource) -> what the admissions hold."""
    out: dict[tuple[str, str, str], float] = {}
    for adm in admissions:
        for r, amount in adm.workload.total().items():
            key = (adm.workload.queue, adm.flavor, r)
            out[key] = out.get(key, 0.0) + amount
    return out


def quota_violations(config: QueueConfig, admissions: Iterable[Admission]) -> list[str]:
    """Every breach of rule 2 (queue limit, cohort lending) and rule 3 (one flavor it has)."""
    admissions = list(admissions)
    problems: list[str] = []
    for adm in admissions:
        queue = config.cluster_queues[adm.workload.queue]
        quotas = {fq.flavor: fq for fq in queue.flavors}
        if adm.flavor not in quotas:
            problems.append(f"{adm.workload.id} admitted to flavor {adm.flavor} of no quota")
            continue
        for r, amount in adm.workload.total().items():
            if amount > 0 and r not in quotas[adm.flavor].resources:
                problems.append(f"{adm.workload.id} holds {r} in {adm.flavor} without quota")
    usage = usage_of(admissions)
    pool_used: dict[tuple[str, str, str], float] = {}
    pool_lendable: dict[tuple[str, str, str], float] = {}
    for queue in config.cluster_queues.values():
        root = root_of(config, queue.cohort) if queue.cohort else ""
        for fq in queue.flavors:
            for r, quota in fq.resources.items():
                u = usage.get((queue.name, fq.flavor, r), 0.0)
                if not root:
                    limit = quota.nominal
                elif quota.borrowing_limit is None:
                    limit = math.inf
                else:
                    limit = quota.nominal + quota.borrowing_limit
                if u > limit + EPS:
                    problems.append(f"{queue.name}/{fq.flavor}/{r}: {u} > limit {limit}")
                if root:
                    lendable = quota.nominal if quota.lending_limit is None else quota.lending_limit
                    guaranteed = quota.nominal - lendable
                    key = (root, fq.flavor, r)
                    pool_used[key] = pool_used.get(key, 0.0) + max(0.0, u - guaranteed)
                    pool_lendable[key] = pool_lendable.get(key, 0.0) + lendable
    for key, used in pool_used.items():
        if used > pool_lendable[key] + EPS:
            problems.append(f"cohort {key}: borrows {used} > lendable {pool_lendable[key]}")
    return problems


def borrows(
    config: QueueConfig, usage: Mapping[tuple[str, str, str], float], queue: str, flavor: str
) -> set[str]:
    """The resources in which a queue uses more than its nominal quota of a flavor."""
    quotas = next(fq for fq in config.cluster_queues[queue].flavors if fq.flavor == flavor)
    return {
        r
        for r in RESOURCE_NAMES
        if usage.get((queue, flavor, r), 0.0)
        > (quotas.resources[r].nominal if r in quotas.resources else 0.0) + EPS
    }


class Driver:
    """Runs an engine like the scheduler service does: preempted jobs stop and queue again."""

    def __init__(self, engine: QueueEngine) -> None:
        self.engine = engine
        self.admitted: dict[str, Admission] = {}
        self.clock = T0

    def submit(self, *workloads: Workload) -> None:
        for w in workloads:
            self.engine.check_satisfiable(w)
            self.engine.add_pending(w)

    def cycle(self, *, stop_victims: bool = True) -> Decisions:
        decisions = self.engine.cycle(self.clock)
        for adm in decisions.admit:
            assert adm.workload.id not in self.admitted
            self.admitted[adm.workload.id] = adm
        if stop_victims:
            self.stop_victims(decisions)
        return decisions

    def stop_victims(self, decisions: Decisions) -> None:
        for p in decisions.preempt:
            self.finish(p.victim.workload.id)
            self.engine.add_pending(p.victim.workload)

    def finish(self, job_id: str) -> None:
        self.admitted.pop(job_id)
        self.engine.remove(job_id)

    def ids(self) -> set[str]:
        return set(self.admitted)
