"""Property tests of the admission rules over random queues, cohorts and workloads.

Each check is computed from the outside (the admissions the engine returned and the config),
not from the engine's own books: quotas never exceeded, borrowing and lending within their
limits, preemption only when allowed and only of the right victims, a preemptor admitted as soon
as its victims stop, gangs whole, usage reported as held, backfill never delaying the head, fair
shares following the weights, and the default configuration admitting as the FIFO scheduler did.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plinth_common.errors import InvalidArgument
from services.scheduler.queueing.config import default_config
from services.scheduler.queueing.engine import Decisions, QueueEngine
from services.scheduler.queueing.model import (
    RESOURCE_NAMES,
    Admission,
    PreemptionPolicy,
    QueueConfig,
    Workload,
)
from tests.unit.scheduler.queueing.builders import (
    EPS,
    T0,
    at,
    borrows,
    config,
    job,
    queue_doc,
    quota_violations,
    root_of,
    usage_of,
)

PRIORITIES = (100, 500, 1000)
POLICIES = [p.value for p in PreemptionPolicy]
FAST = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def configs(draw: st.DrawFn, *, cohorts: bool = True, preemption: bool = True) -> QueueConfig:
    """1 to 4 queues over 1 or 2 flavors, in 0 to 2 cohorts, quotas of cpu and maybe gpu."""
    flavors = [f"f{i}" for i in range(draw(st.integers(1, 2)))]
    n = draw(st.integers(1, 4))
    queues: list[dict[str, Any]] = []
    given_flavor: set[str] = set()
    for i in range(n):
        cohort = draw(st.sampled_from(["", "c1", "c2"])) if cohorts else ""
        mine = draw(st.lists(st.sampled_from(flavors), min_size=1, max_size=2, unique=True))
        resources: dict[str, dict[str, Any]] = {}
        for f in mine:
            quota: dict[str, Any] = {}
            for r in ("cpu", "gpu"):
                if r == "gpu" and not draw(st.booleans()):
                    continue
                nominal = draw(st.integers(0, 6))
                if f not in given_flavor and r == "cpu":
                    nominal = max(nominal, 1)  # every flavor has some quota somewhere
                q: dict[str, Any] = {"nominal": nominal}
                if cohort and draw(st.booleans()):
                    q["borrowing_limit"] = draw(st.integers(0, 4))
                if cohort and draw(st.booleans()):
                    q["lending_limit"] = draw(st.integers(0, nominal))
                quota[r] = q
            given_flavor.add(f)
            resources[f] = quota
        queues.append(
            queue_doc(
                f"q{i}",
                cohort=cohort,
                flavors=resources,
                weight=draw(st.integers(1, 3)),
                within=draw(st.sampled_from(POLICIES)) if preemption else "never",
                reclaim=draw(st.sampled_from(POLICIES)) if preemption else "never",
            )
        )
    return config(*queues, flavors=sorted(given_flavor))


@st.composite
def workloads(draw: st.DrawFn, queues: list[str], *, runtimes: bool = True) -> Workload:
    n = draw(st.integers(0, 10**6))
    return job(
        f"j-{n}",
        draw(st.sampled_from(queues)),
        cpu=draw(st.integers(0, 3)),
        gpu=draw(st.sampled_from([0, 0, 1, 2])),
        replicas=draw(st.sampled_from([1, 1, 2, 3])),
        priority=draw(st.sampled_from(PRIORITIES)),
        runtime=draw(st.one_of(st.none(), st.integers(10, 200).map(float))) if runtimes else None,
        order=float(draw(st.integers(0, 50))),
    )


@dataclass
class World:
    """The engine driven like the service drives it, and everything we know from outside."""

    config: QueueConfig
    engine: QueueEngine
    admitted: dict[str, Admission] = field(default_factory=dict)
    pending: dict[str, Workload] = field(default_factory=dict)
    stopping: dict[str, str] = field(default_factory=dict)  # victim -> preemptor
    released: set[str] = field(default_factory=set)  # preemptors whose victims all stopped
    clock: float = 0.0

    def submit(self, w: Workload) -> None:
        if w.id in self.pending or w.id in self.admitted:
            return
        try:
            self.engine.check_satisfiable(w)
        except InvalidArgument:
            return
        self.engine.add_pending(w)
        self.pending[w.id] = w

    def finish(self, index: int) -> None:
        running = sorted(i for i in self.admitted if i not in self.stopping)
        if running:
            job_id = running[index % len(running)]
            del self.admitted[job_id]
            self.engine.remove(job_id)

    def stop_victims(self) -> None:
        for victim in sorted(self.stopping):
            adm = self.admitted.pop(victim)
            self.engine.remove(victim)
            self.engine.add_pending(adm.workload)
            self.pending[victim] = adm.workload
        preemptors = set(self.stopping.values())
        self.stopping.clear()
        self.released |= preemptors

    def cycle(self) -> Decisions:
        before = dict(self.admitted)
        in_flight = bool(self.stopping)
        released = self.released
        self.released = set()
        decisions = self.engine.cycle(at(self.clock))
        admitted_ids = {a.workload.id for a in decisions.admit}
        for adm in decisions.admit:
            assert adm.workload.id in self.pending, "admitted a job that was not pending"
            assert adm.workload.id not in self.admitted, "admitted twice"
            del self.pending[adm.workload.id]
            self.admitted[adm.workload.id] = adm
        # A preemptor is admitted in the first cycle after its victims have stopped.
        for preemptor in released:
            if preemptor in self.pending:
                assert preemptor in admitted_ids, f"{preemptor} not admitted once victims stopped"
        problems = quota_violations(self.config, self.admitted.values())
        assert problems == [], problems
        self.check_preemptions(decisions, before, admitted_ids, in_flight)
        self.check_report()
        return decisions

    def check_preemptions(
        self,
        decisions: Decisions,
        before: dict[str, Admission],
        admitted_ids: set[str],
        in_flight: bool,
    ) -> None:
        usage = usage_of(self.admitted.values())
        for p in decisions.preempt:
            victim = p.victim.workload
            assert victim.id in before, "preempted a job that was not running before the cycle"
            assert victim.id not in self.stopping, f"{victim.id} chosen twice"
            assert p.preemptor_id in self.pending and p.preemptor_id not in admitted_ids
            preemptor = self.pending[p.preemptor_id]
            queue = self.config.cluster_queues[preemptor.queue]
            if victim.queue == preemptor.queue:
                policy = queue.preemption.within_queue
                assert policy is not PreemptionPolicy.NEVER
                later = (-victim.priority, victim.order, victim.id) > (
                    -preemptor.priority,
                    preemptor.order,
                    preemptor.id,
                )
                assert victim.priority < preemptor.priority or (
                    policy is PreemptionPolicy.ANY
                    and victim.priority == preemptor.priority
                    and later
                ), (victim, preemptor)
            else:
                policy = queue.preemption.reclaim_within_cohort
                assert policy is not PreemptionPolicy.NEVER
                other = self.config.cluster_queues[victim.queue]
                assert queue.cohort and other.cohort
                assert root_of(self.config, queue.cohort) == root_of(self.config, other.cohort)
                if policy is PreemptionPolicy.LOWER_PRIORITY:
                    assert victim.priority < preemptor.priority
                needs = {r for r, v in preemptor.total().items() if v > 0}
                held = {r for r, v in victim.total().items() if v > 0}
                assert borrows(self.config, usage, victim.queue, p.victim.flavor) & needs & held, (
                    "reclaimed from a queue that does not borrow what the preemptor needs"
                )
            self.stopping[victim.id] = p.preemptor_id
        if not in_flight and not self.stopping:
            return
        if not in_flight:
            # With nothing else in flight, a preemptor could not have been admitted as things
            # are (admissions after its turn only took capacity away).
            for preemptor_id in set(self.stopping.values()):
                w = self.pending[preemptor_id]
                assert not self.fits_somewhere(w), f"{preemptor_id} preempted though it fits"

    def fits_somewhere(self, w: Workload) -> bool:
        queue = self.config.cluster_queues[w.queue]
        for fq in queue.flavors:
            trial = Admission(workload=w, flavor=fq.flavor, admitted_at=T0)
            if not quota_violations(self.config, [*self.admitted.values(), trial]):
                return True
        return False

    def check_report(self) -> None:
        report = self.engine.report(at(self.clock))
        usage = usage_of(self.admitted.values())
        for status in report.queues:
            for res in status.resources:
                held = usage.get((status.name, res.flavor, res.resource), 0.0)
                assert abs(res.usage - held) < EPS, (status.name, res, held)
                assert abs(res.borrowed - max(0.0, held - res.nominal)) < EPS
        assert sorted(p.job_id for p in report.pending) == sorted(self.pending)


@FAST
@given(st.data())
def test_random_runs_keep_every_rule(data: st.DataObject) -> None:
    cfg = data.draw(configs())
    world = World(cfg, QueueEngine(cfg))
    names = sorted(cfg.cluster_queues)
    for w in data.draw(st.lists(workloads(names), max_size=25)):
        world.submit(w)
    ops = data.draw(
        st.lists(
            st.one_of(
                st.just(("cycle", 0)),
                st.tuples(st.just("finish"), st.integers(0, 100)),
                st.tuples(st.just("advance"), st.integers(1, 120)),
                st.just(("stop", 0)),
                st.tuples(st.just("submit"), st.integers(0, 3)),
            ),
            min_size=3,
            max_size=30,
        )
    )
    for op, arg in [("cycle", 0), *ops, ("cycle", 0)]:
        if op == "cycle":
            world.cycle()
        elif op == "finish":
            world.finish(arg)
        elif op == "advance":
            world.clock += arg
        elif op == "stop":
            world.stop_victims()
        else:
            for w in data.draw(st.lists(workloads(names), max_size=arg)):
                world.submit(w)


@FAST
@given(st.data())
def test_backfill_never_delays_the_head_jobs_estimate(data: st.DataObject) -> None:
    cfg = data.draw(configs(cohorts=False, preemption=False))
    engine = QueueEngine(cfg)
    names = sorted(cfg.cluster_queues)
    world = World(cfg, engine)
    for w in data.draw(st.lists(workloads(names), min_size=1, max_size=20)):
        world.submit(w)
    world.cycle()  # some are running now, with their expected ends
    world.clock += data.draw(st.integers(0, 100))
    for w in data.draw(st.lists(workloads(names), max_size=15)):
        world.submit(w)
    now = at(world.clock)
    before = engine.report(now)
    heads = {}
    for queue in names:
        rows = [p for p in before.pending if p.queue == queue]
        blocked = next((p for p in rows if p.reason.startswith("waiting for")), None)
        if blocked is not None:
            heads[queue] = blocked
    decisions = world.cycle()
    after = engine.report(now)
    for queue, head in heads.items():
        still = after.pending_of(head.job_id)
        if still is None:
            continue  # admitted
        if head.estimated_start is not None:
            assert still.estimated_start is not None, (head, still)
            assert still.estimated_start <= head.estimated_start, (head, still, decisions)
        else:
            # A head without an estimate lets nothing of its queue past it.
            key = (-head.priority, engine_order(world, head.job_id), head.job_id)
            for adm in decisions.admit:
                w = adm.workload
                if w.queue == queue:
                    assert (-w.priority, w.order, w.id) < key, (w, head)


def engine_order(world: World, job_id: str) -> float:
    return world.pending[job_id].order


@settings(max_examples=12, deadline=None)
@given(
    weights=st.lists(st.integers(1, 3), min_size=2, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_fair_shares_converge_to_the_weights(weights: list[int], seed: int) -> None:
    capacity = 30
    lender = queue_doc("pool", cohort="c", flavors={"f": {"cpu": {"nominal": capacity}}}, teams=[])
    queues = [
        queue_doc(f"q{i}", cohort="c", flavors={"f": {"cpu": {"nominal": 0}}}, weight=w)
        for i, w in enumerate(weights)
    ]
    engine = QueueEngine(config(lender, *queues))
    rng = random.Random(seed)
    count = 0
    for i in range(len(weights)):
        for _ in range(1000):  # more than any queue can run in the time simulated
            count += 1
            engine.add_pending(job(f"j-{count}", f"q{i}", runtime=100.0, order=float(count)))
    ends: list[tuple[float, str, str]] = []
    held: dict[str, int] = {f"q{i}": 0 for i in range(len(weights))}
    area: dict[str, float] = dict.fromkeys(held, 0.0)
    clock = 0.0
    warmup = 300.0
    for adm in engine.cycle(at(clock)).admit:
        held[adm.workload.queue] += 1
        ends.append((clock + rng.uniform(20, 100), adm.workload.id, adm.workload.queue))
    while clock < 1500:
        ends.sort()
        end, job_id, queue = ends.pop(0)
        if end > warmup:
            for q, n in held.items():
                area[q] += n * (end - max(clock, warmup))
        clock = end
        engine.remove(job_id)
        held[queue] -= 1
        for adm in engine.cycle(at(clock)).admit:
            held[adm.workload.queue] += 1
            ends.append((clock + rng.uniform(20, 100), adm.workload.id, adm.workload.queue))
        assert sum(held.values()) <= capacity
    total = sum(area.values())
    for i, w in enumerate(weights):
        share = area[f"q{i}"] / total
        # Within one slot of the exact split (slots are whole cores), and a little noise.
        assert abs(share - w / sum(weights)) < 1 / capacity + 0.02, (weights, area)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_default_config_admits_as_the_fifo_scheduler_did(data: st.DataObject) -> None:
    capacity = {
        "cpu": float(data.draw(st.integers(1, 8))),
        "memory": float(data.draw(st.integers(1, 8))),
        "gpu": float(data.draw(st.integers(0, 2))),
    }
    engine = QueueEngine(default_config(capacity))
    queue = engine.queue_of("any-team").name
    jobs = []
    for i in range(data.draw(st.integers(1, 25))):
        w = Workload(
            id=f"j-{i:03d}",
            team=data.draw(st.sampled_from(["a", "b"])),
            queue=queue,
            priority=engine.config.priority_classes["normal"].value,
            request={r: float(data.draw(st.integers(0, int(capacity[r])))) for r in RESOURCE_NAMES},
            order=float(i),
        )
        engine.check_satisfiable(w)
        engine.add_pending(w)
        jobs.append(w)
    queued = list(jobs)
    running: list[Workload] = []
    for step in range(40):
        free = {r: capacity[r] - sum(w.request[r] for w in running) for r in RESOURCE_NAMES}
        expected = []
        for w in queued:  # strict FIFO: stop at the first job that does not fit
            if any(w.request[r] > free[r] + EPS for r in RESOURCE_NAMES):
                break
            expected.append(w.id)
            free = {r: free[r] - w.request[r] for r in RESOURCE_NAMES}
        decisions = engine.cycle(at(step))
        assert [a.workload.id for a in decisions.admit] == expected
        assert decisions.preempt == []
        admitted = {a.workload.id for a in decisions.admit}
        running += [w for w in queued if w.id in admitted]
        queued = [w for w in queued if w.id not in admitted]
        if running:
            done = running.pop(data.draw(st.integers(0, len(running) - 1)))
            engine.remove(done.id)
        if not queued and not running:
            break
