"""The scheduler's admission: decisions per second and per-decision latency of the engine.

Admission (this file's :func:`admission_benchmark`): the pure engine
(``services.scheduler.queueing.engine``) with 10,000 pending jobs across 20 teams (20 cluster
queues) in 4 cohorts of 5, two flavors (``cpu``, ``gpu-a100``) with nominal quotas, borrowing
and lending limits, three priority classes (a tenth of the jobs ``high``, able to preempt),
fair weights 1 to 3, gangs of 1 to 4 replicas, and declared run times (5% have none). After
the first cycle fills the quotas, the steady state runs on a simulated clock: the next job to
end is removed, a new one arrives (10,000 stay pending), and ``cycle()`` is timed; preempted
jobs stop at once and are queued again. A decision is one admission or one preemption.
``report()`` (what GetQueue serves) is timed over the same 10,000 pending jobs.

SLURM beside Plinth (:mod:`bench.slurm_vs_plinth`): the same 1,000 short jobs submitted to a
one-node SLURM cluster started here and to a real scheduler process; submission throughput and
submit-to-start latency p50/p99 of both, in the same run (skipped, saying how to enable it,
without slurm-wlm or root).

    python -m bench.scheduler              # admission ~30 s, then SLURM vs Plinth ~2-3 min
    python -m bench.scheduler --quick      # ~10 s, and 100 jobs each
    python -m bench.scheduler --no-slurm   # the admission engine only

Prints figures beside peers; never asserts. Targets: >= 1,000 admissions/s, p99 decision
latency < 10 ms, report < 200 ms. Peers: a published MultiKueue run admitted about 1.3
workloads/s end to end, limited by its API client rate (kueue#8564); Kueue's own scheduling
cycle admits one head per ClusterQueue per cycle.
"""

from __future__ import annotations

import argparse
import heapq
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import slurm_vs_plinth
from bench.common import Latency, machine_line, ms, print_table, rate
from services.scheduler.queueing.config import parse_config
from services.scheduler.queueing.engine import QueueEngine
from services.scheduler.queueing.model import Admission, QueueConfig, Workload

GI = 2**30
TEAMS = 20
COHORTS = 4
PENDING = 10_000
PRIORITIES = (("low", 100, 0.3), ("normal", 500, 0.6), ("high", 1000, 0.1))
SHAPES = (  # per replica: cpu, memory, gpu
    (1, 2 * GI, 0),
    (2, 4 * GI, 0),
    (4, 8 * GI, 0),
    (8, 16 * GI, 0),
    (2, 8 * GI, 1),
    (4, 16 * GI, 1),
    (8, 32 * GI, 2),
)


@dataclass(frozen=True)
class Options:
    steady_events: int
    report_runs: int
    seed: int = 8


def bench_config() -> QueueConfig:
    """20 queues (one per team) in 4 cohorts, two flavors, limits and weights varied."""
    queues: list[dict[str, Any]] = []
    for i in range(TEAMS):
        cohort = f"cohort-{i % COHORTS}"
        queues.append(
            {
                "name": f"team-{i:02d}",
                "teams": [f"team-{i:02d}"],
                "cohort": cohort,
                "fair_weight": 1 + i % 3,
                "preemption": {"within_queue": "lower_priority", "reclaim_within_cohort": "any"},
                "flavors": [
                    {
                        "flavor": "gpu-a100",
                        "resources": {
                            "cpu": {"nominal": 32, "lending_limit": 16},
                            "memory": {"nominal": "256Gi"},
                            "gpu": {"nominal": 4 + 4 * (i % 2), "borrowing_limit": 8},
                        },
                    },
                    {
                        "flavor": "cpu",
                        "resources": {
                            "cpu": {"nominal": 64, "borrowing_limit": 64},
                            "memory": {"nominal": "256Gi", "lending_limit": "128Gi"},
                        },
                    },
                ],
            }
        )
    return parse_config(
        {
            "flavors": [{"name": "cpu"}, {"name": "gpu-a100", "labels": {"gpu": "a100"}}],
            "priority_classes": [{"name": n, "value": v} for n, v, _ in PRIORITIES],
            "cohorts": [{"name": f"cohort-{c}"} for c in range(COHORTS)],
            "cluster_queues": queues,
        }
    )


class Workloads:
    """A deterministic stream of jobs, and the true run time of each (at most the declared)."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.count = 0
        self.actual: dict[str, float] = {}

    def next(self, order: float) -> Workload:
        r = self.random
        self.count += 1
        team = f"team-{r.randrange(TEAMS):02d}"
        cpu, memory, gpu = r.choice(SHAPES)
        replicas = r.choice((1, 1, 1, 2, 4)) if gpu else 1
        priority = r.choices([v for _, v, _ in PRIORITIES], [p for *_, p in PRIORITIES])[0]
        declared = None if r.random() < 0.05 else r.choice((600.0, 1800.0, 3600.0, 7200.0))
        job_id = f"j-{self.count:06d}"
        self.actual[job_id] = (declared or 3600.0) * r.uniform(0.3, 1.0)
        return Workload(
            id=job_id,
            team=team,
            queue=team,
            priority=priority,
            request={"cpu": cpu, "memory": memory, "gpu": gpu},
            replicas=replicas,
            order=order,
            expected_runtime_s=declared,
            runtime_basis="declared maximum run time" if declared else "",
        )


def admission_benchmark(options: Options | None = None) -> dict[str, Any]:
    """Runs the admission benchmark; returns its figures (see the module docstring)."""
    options = options or Options(steady_events=3000, report_runs=5)
    engine = QueueEngine(bench_config())
    jobs = Workloads(options.seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    clock = start
    engine.load(admitted=[], pending=[jobs.next(float(i)) for i in range(PENDING)])

    ends: list[tuple[datetime, str]] = []
    admitted: dict[str, Admission] = {}

    def record(decisions_admit: list[Admission]) -> None:
        for adm in decisions_admit:
            admitted[adm.workload.id] = adm
            end = adm.admitted_at + timedelta(seconds=jobs.actual[adm.workload.id])
            heapq.heappush(ends, (end, adm.workload.id))

    t0 = time.perf_counter()
    first = engine.cycle(clock)
    fill_s = time.perf_counter() - t0
    record(first.admit)

    cycle_s: list[float] = []
    per_decision_s: list[float] = []
    admissions = preemptions = 0
    busy_s = cpu_s = 0.0
    for _ in range(options.steady_events):
        while ends and ends[0][1] not in admitted:
            heapq.heappop(ends)  # preempted earlier: its end is void
        if not ends:
            break
        end, job_id = heapq.heappop(ends)
        clock = max(clock, end)
        engine.remove(job_id)
        del admitted[job_id]
        engine.add_pending(jobs.next(float(PENDING + jobs.count)))
        t0 = time.perf_counter()
        c0 = time.thread_time()
        decisions = engine.cycle(clock)
        elapsed = time.perf_counter() - t0
        cpu_s += time.thread_time() - c0
        busy_s += elapsed
        cycle_s.append(elapsed)
        made = len(decisions.admit) + len(decisions.preempt)
        if made:  # a cycle that decided nothing has no per-decision latency
            per_decision_s.extend([elapsed / made] * made)
        admissions += len(decisions.admit)
        preemptions += len(decisions.preempt)
        record(decisions.admit)
        for p in decisions.preempt:  # the victim stops at once and queues again
            victim = p.victim.workload
            engine.remove(victim.id)
            admitted.pop(victim.id, None)
            engine.add_pending(victim)

    pending = len(engine.pending_ids())
    report_s: list[float] = []
    report_cpu_s: list[float] = []
    report = None
    for _ in range(options.report_runs):
        t0 = time.perf_counter()
        c0 = time.thread_time()
        report = engine.report(clock)
        report_s.append(time.perf_counter() - t0)
        report_cpu_s.append(time.thread_time() - c0)
    team_s: list[float] = []
    for _ in range(options.report_runs):
        t0 = time.perf_counter()
        engine.report(clock, teams=["team-00"])
        team_s.append(time.perf_counter() - t0)
    estimated = sum(1 for p in report.pending if p.estimated_start) if report else 0
    return {
        "pending": pending,
        "admitted": len(admitted),
        "fill_admissions": len(first.admit),
        "fill_s": fill_s,
        "cycles": len(cycle_s),
        "admissions": admissions,
        "preemptions": preemptions,
        "busy_s": busy_s,
        "cpu_s": cpu_s,
        "simulated_hours": (clock - start).total_seconds() / 3600,
        "decisions_per_s": (admissions + preemptions) / busy_s if busy_s else float("nan"),
        "admissions_per_s": admissions / busy_s if busy_s else float("nan"),
        "cycle": Latency.of_seconds(cycle_s),
        "decision": Latency.of_seconds(per_decision_s),
        "report": Latency.of_seconds(report_s),
        "report_cpu": Latency.of_seconds(report_cpu_s),
        "decisions_per_cpu_s": (admissions + preemptions) / cpu_s if cpu_s else float("nan"),
        "admissions_per_cpu_s": admissions / cpu_s if cpu_s else float("nan"),
        "report_team": Latency.of_seconds(team_s),
        "report_estimated": estimated,
        "report_rows": len(report.pending) if report else 0,
    }


def print_admission(result: dict[str, Any]) -> None:
    """Prints the admission figures as tables, peers beside."""
    print(
        f"\nadmission engine: {result['pending']:,} pending, {TEAMS} teams/queues in {COHORTS} "
        f"cohorts, 2 flavors; first cycle admitted {result['fill_admissions']:,} in "
        f"{result['fill_s'] * 1000:.0f} ms; steady state: {result['cycles']:,} cycles over "
        f"{result['simulated_hours']:.1f} simulated hours, {result['admissions']:,} admissions, "
        f"{result['preemptions']:,} preemptions"
    )
    print(
        f"engine busy {result['busy_s']:.2f} s wall, {result['cpu_s']:.2f} s cpu (the rest is "
        "waiting for a core on a shared machine)"
    )
    print_table(
        "admission throughput (engine busy time)",
        ["path", "decisions/s", "admissions/s", "target"],
        [
            [
                "plinth QueueEngine.cycle",
                rate(result["decisions_per_s"]),
                rate(result["admissions_per_s"]),
                ">= 1,000",
            ],
            [
                "plinth QueueEngine.cycle, per cpu second",
                rate(result["decisions_per_cpu_s"]),
                rate(result["admissions_per_cpu_s"]),
                "(this process's cpu time)",
            ],
            ["MultiKueue, published (kueue#8564)", "-", "1.3", "end to end, API-rate bound"],
        ],
    )
    print_table(
        "latency (ms)",
        ["what", "n", "p50", "p90", "p99", "max", "target p99"],
        [
            [
                "per decision (cycle / decisions)",
                result["decision"].n,
                *result["decision"].cells(),
                "< 10",
            ],
            [
                "per cycle (one job ended, one arrived)",
                result["cycle"].n,
                *result["cycle"].cells(),
                "-",
            ],
            [
                f"report(), all {result['report_rows']:,} pending",
                result["report"].n,
                *result["report"].cells(),
                "< 200",
            ],
            [
                "report(), cpu time",
                result["report_cpu"].n,
                *result["report_cpu"].cells(),
                "< 200",
            ],
            [
                "report(teams=[one team])",
                result["report_team"].n,
                *result["report_team"].cells(),
                "-",
            ],
        ],
    )
    print(
        f"report: {result['report_estimated']:,} of {result['report_rows']:,} pending jobs have "
        f"an estimated start (the others wait behind a job with no run time); "
        f"decision p99 {ms(result['decision'].p99)} ms"
    )


def main() -> None:
    """Runs every part of the scheduler benchmark (the SLURM comparison adds its own)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer cycles")
    parser.add_argument(
        "--jobs",
        type=int,
        default=slurm_vs_plinth.DEFAULT_JOBS,
        help="jobs per system in the SLURM comparison (default 1,000; --quick: 100)",
    )
    parser.add_argument("--no-slurm", action="store_true", help="skip the SLURM comparison")
    args = parser.parse_args()
    print(machine_line())
    options = Options(steady_events=800, report_runs=3) if args.quick else Options(3000, 5)
    print_admission(admission_benchmark(options))
    if not args.no_slurm:
        compared = slurm_vs_plinth.Options(
            jobs=100 if args.quick else args.jobs,
            concurrency=slurm_vs_plinth.DEFAULT_CONCURRENCY,
            slots=slurm_vs_plinth.DEFAULT_SLOTS,
        )
        slurm_vs_plinth.report(slurm_vs_plinth.slurm_comparison(compared), compared)


if __name__ == "__main__":
    main()
