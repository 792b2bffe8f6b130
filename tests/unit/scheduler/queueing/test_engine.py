"""The admission engine, rule by rule, on small scenes a user would recognise."""

from __future__ import annotations

from typing import Any

import pytest

from plinth_common.errors import InvalidArgument
from services.scheduler.queueing.config import default_config
from services.scheduler.queueing.engine import QueueEngine
from services.scheduler.queueing.model import Admission
from tests.unit.scheduler.queueing.builders import (
    T0,
    Driver,
    at,
    config,
    job,
    queue_doc,
    quota_violations,
    row,
    status,
)

CPU4 = {"f": {"cpu": {"nominal": 4}}}


def driver(*queues: dict[str, Any], **extra: Any) -> Driver:
    return Driver(QueueEngine(config(*queues, **extra)))


def admitted_ids(d: Driver) -> list[str]:
    return sorted(d.admitted)


# ---------------------------------------------------------------- quotas


def test_a_team_at_quota_waits_with_the_quota_reason() -> None:
    d = driver(
        queue_doc("vision", flavors={"gpu-a100": {"gpu": {"nominal": 4}}}), flavors=["gpu-a100"]
    )
    d.submit(job("j-1", "vision", cpu=0, gpu=4, runtime=600), job("j-2", "vision", cpu=0, gpu=2))
    decisions = d.cycle()
    assert [a.workload.id for a in decisions.admit] == ["j-1"]
    assert decisions.admit[0].flavor == "gpu-a100"
    entry = d.engine.report(T0).pending_of("j-2")
    assert entry is not None
    assert entry.reason == (
        "waiting for 2 gpu in flavor gpu-a100: queue vision uses 4 of its 4; first in its queue"
    )
    assert entry.estimated_start == at(600)
    assert entry.estimate_basis == "when 1 running job end, by declared maximum run time"


def test_in_a_cohort_the_reason_says_what_the_cohort_can_lend() -> None:
    d = driver(
        queue_doc("vision", cohort="research", flavors={"f": {"gpu": {"nominal": 4}}}),
        queue_doc("nlp", cohort="research", flavors={"f": {"gpu": {"nominal": 2}}}),
    )
    d.submit(*(job(f"j-{i}", "vision", cpu=0, gpu=2) for i in range(1, 5)))
    assert len(d.cycle().admit) == 3  # 4 of its own, 2 borrowed from nlp
    report = d.engine.report(T0)
    entry = report.pending_of("j-4")
    assert entry is not None
    assert entry.reason == (
        "waiting for 2 gpu in flavor f: queue vision uses 6 of its 4, the cohort has 0 to lend; "
        "first in its queue"
    )
    gpu = next(r for r in status(report, "vision").resources if r.resource == "gpu")
    assert (gpu.nominal, gpu.usage, gpu.borrowed) == (4, 6, 2)
    nlp_gpu = next(r for r in status(report, "nlp").resources if r.resource == "gpu")
    assert nlp_gpu.lent == 2


def test_borrowing_stops_at_the_borrowing_limit() -> None:
    d = driver(
        queue_doc("a", cohort="c", flavors={"f": {"cpu": {"nominal": 4, "borrowing_limit": 2}}}),
        queue_doc("b", cohort="c", flavors={"f": {"cpu": {"nominal": 4}}}),
    )
    d.submit(*(job(f"j-{i}", "a") for i in range(1, 10)))
    d.cycle()
    assert len(d.admitted) == 6
    entry = d.engine.report(T0).pending_of("j-7")
    assert entry is not None
    assert "queue a uses 6 of its 4 (it may borrow 2 at most)" in entry.reason


def test_lending_stops_at_the_lending_limit() -> None:
    d = driver(
        queue_doc("a", cohort="c", flavors={"f": {"cpu": {"nominal": 4}}}),
        queue_doc("b", cohort="c", flavors={"f": {"cpu": {"nominal": 4, "lending_limit": 1}}}),
    )
    d.submit(*(job(f"j-{i}", "a") for i in range(1, 10)))
    d.cycle()
    assert len(d.admitted) == 5  # its own 4 and the 1 that b lends
    # b keeps its 3 unlendable cores: its jobs get in without preempting anybody.
    d.submit(*(job(f"j-{i}", "b") for i in range(20, 23)))
    decisions = d.cycle()
    assert sorted(a.workload.id for a in decisions.admit) == ["j-20", "j-21", "j-22"]
    assert decisions.preempt == []


def test_a_queue_without_cohort_never_borrows() -> None:
    d = driver(queue_doc("a", flavors=CPU4), queue_doc("b", flavors=CPU4))
    d.submit(*(job(f"j-{i}", "a") for i in range(1, 7)))
    d.cycle()
    assert len(d.admitted) == 4


def test_flavor_order_without_borrowing_first_then_borrowing() -> None:
    flavors = {"small": {"cpu": {"nominal": 1}}, "big": {"cpu": {"nominal": 4}}}
    d = driver(
        queue_doc("a", cohort="c", flavors=flavors),
        queue_doc("b", cohort="c", flavors={"small": {"cpu": {"nominal": 4}}}),
        flavors=["small", "big"],
    )
    d.submit(job("j-1", "a"), job("j-2", "a", cpu=2), job("j-3", "a", cpu=2), job("j-4", "a"))
    d.cycle()
    flavors_of = {i: a.flavor for i, a in d.admitted.items()}
    # j-1 fits small; j-2, j-3 fit big without borrowing; j-4 fits neither without borrowing:
    # it borrows in the first flavor that lends (small, from b).
    assert flavors_of == {"j-1": "small", "j-2": "big", "j-3": "big", "j-4": "small"}


def test_a_flavor_without_quota_for_a_resource_cannot_hold_it() -> None:
    d = driver(
        queue_doc(
            "a",
            flavors={
                "cpu": {"cpu": {"nominal": 8}},
                "gpu": {"gpu": {"nominal": 2}, "cpu": {"nominal": 2}},
            },
        ),
        flavors=["cpu", "gpu"],
    )
    d.submit(job("j-1", "a", cpu=1, gpu=1))
    d.cycle()
    assert d.admitted["j-1"].flavor == "gpu"


# ---------------------------------------------------------------- gang


def test_a_gang_is_admitted_whole_in_one_flavor_or_not_at_all() -> None:
    flavors = {"x": {"gpu": {"nominal": 4}}, "y": {"gpu": {"nominal": 4}}}
    d = driver(queue_doc("a", flavors=flavors), flavors=["x", "y"])
    d.submit(job("j-1", "a", cpu=0, gpu=2, runtime=100), job("j-2", "a", cpu=0, gpu=2, runtime=100))
    d.cycle()
    assert {a.flavor for a in d.admitted.values()} == {"x"}
    d.submit(job("j-3", "a", cpu=0, gpu=2, runtime=100))
    d.cycle()
    assert d.admitted["j-3"].flavor == "y"
    # 2 free in x and 2 in y: a gang of 2 x 2 gpu does not split, and holds nothing meanwhile.
    d.submit(job("j-4", "a", cpu=0, gpu=2, replicas=2))
    assert d.cycle().admit == []
    assert [r.usage for r in status(d.engine.report(T0), "a").resources] == [4, 2]
    entry = d.engine.report(T0).pending_of("j-4")
    assert entry is not None
    assert entry.reason.startswith("waiting for 4 gpu (2 per replica x 2 replicas) in flavor x")
    d.finish("j-3")
    assert [a.workload.id for a in d.cycle().admit] == ["j-4"]
    assert d.admitted["j-4"].flavor == "y"


def test_a_gang_no_flavor_could_ever_hold_is_refused_naming_replicas() -> None:
    flavors = {"x": {"gpu": {"nominal": 4}}, "y": {"gpu": {"nominal": 4}}}
    engine = QueueEngine(config(queue_doc("vision", flavors=flavors), flavors=["x", "y"]))
    with pytest.raises(InvalidArgument) as caught:
        engine.check_satisfiable(job("j-1", "vision", cpu=0, gpu=3, replicas=2))
    assert caught.value.field == "spec.replicas"
    with pytest.raises(InvalidArgument) as caught:
        engine.check_satisfiable(job("j-1", "vision", cpu=0, gpu=5))
    assert caught.value.field == "spec.resources.gpu"
    assert caught.value.problem == (
        "5 gpu exceeds what any flavor of queue vision can ever give (at most 4 gpu in flavor x)"
    )
    with pytest.raises(InvalidArgument) as caught:
        engine.check_satisfiable(job("j-1", "vision", cpu=1, gpu=0))
    assert caught.value.field == "spec.resources.cpu"
    assert "no flavor of it has any cpu" in caught.value.problem
    with pytest.raises(InvalidArgument) as caught:
        engine.check_satisfiable(job("j-1", "vision", cpu=0, gpu=1, replicas=0))
    assert caught.value.field == "spec.replicas"


def test_what_a_cohort_could_lend_counts_as_satisfiable() -> None:
    engine = QueueEngine(
        config(
            queue_doc(
                "a", cohort="c", flavors={"f": {"gpu": {"nominal": 2, "borrowing_limit": 2}}}
            ),
            queue_doc("b", cohort="c", flavors={"f": {"gpu": {"nominal": 8}}}),
        )
    )
    engine.check_satisfiable(job("j-1", "a", cpu=0, gpu=4))
    with pytest.raises(InvalidArgument) as caught:
        engine.check_satisfiable(job("j-1", "a", cpu=0, gpu=2, replicas=3))
    assert caught.value.field == "spec.replicas"


def test_queue_of_a_team_and_the_default_queue() -> None:
    engine = QueueEngine(config(queue_doc("vision", teams=["vision", "vision-2"])))
    assert engine.queue_of("vision-2").name == "vision"
    with pytest.raises(InvalidArgument) as caught:
        engine.queue_of("nlp")
    assert caught.value.field == "spec.team"
    engine = QueueEngine(config(queue_doc("shared", teams=[]), default_queue="shared"))
    assert engine.queue_of("nlp").name == "shared"


# ---------------------------------------------------------------- priority and preemption


def test_a_higher_priority_job_preempts_the_newest_lower_one_then_waits_for_it() -> None:
    d = driver(queue_doc("vision", flavors={"f": {"cpu": {"nominal": 2}}}))
    d.submit(job("j-1", "vision", priority=100), job("j-2", "vision", priority=500))
    d.cycle()
    d.clock = at(10)
    d.submit(job("j-3", "vision", priority=1000))
    decisions = d.cycle(stop_victims=False)
    assert decisions.admit == []  # it waits for the victim to stop
    assert [(p.victim.workload.id, p.preemptor_id) for p in decisions.preempt] == [("j-1", "j-3")]
    assert decisions.preempt[0].reason == (
        "preempted by job j-3 (priority high 1000 > low 100) in queue vision"
    )
    entry = d.engine.report(d.clock).pending_of("j-3")
    assert entry is not None and entry.reason == "waiting for 1 preempted job to stop"
    # The next cycles do not preempt again while the victim stops.
    assert d.cycle(stop_victims=False).preempt == []
    d.stop_victims(decisions)
    assert [a.workload.id for a in d.cycle().admit] == ["j-3"]
    assert admitted_ids(d) == ["j-2", "j-3"]
    assert d.engine.pending_ids() == ["j-1"]


def test_lower_priority_policy_never_preempts_an_equal_priority() -> None:
    for within, preempted in (("lower_priority", []), ("any", ["j-9"]), ("never", [])):
        engine = QueueEngine(
            config(queue_doc("q", flavors={"f": {"cpu": {"nominal": 2}}}, within=within))
        )
        later = job("j-9", "q", cpu=2)  # queued after j-1 but admitted (say, by backfill)
        engine.load(
            admitted=[Admission(workload=later, flavor="f", admitted_at=T0)],
            pending=[job("j-1", "q", cpu=2)],
        )
        decisions = engine.cycle(at(1))
        assert [p.victim.workload.id for p in decisions.preempt] == preempted, within


def test_equal_priority_never_preempts_a_job_queued_before_it() -> None:
    engine = QueueEngine(
        config(queue_doc("q", flavors={"f": {"cpu": {"nominal": 2}}}, within="any"))
    )
    engine.load(
        admitted=[Admission(workload=job("j-1", "q", cpu=2), flavor="f", admitted_at=T0)],
        pending=[job("j-5", "q", cpu=2)],
    )
    assert engine.cycle(at(1)).preempt == []


def test_no_preemption_when_the_job_would_still_not_fit() -> None:
    d = driver(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}}))
    d.submit(job("j-1", "q", cpu=2, priority=100), job("j-2", "q", cpu=2, priority=1000))
    d.cycle()
    d.submit(job("j-3", "q", cpu=3, priority=1000))  # freeing j-1 leaves 2: not enough
    assert d.cycle().preempt == []
    assert admitted_ids(d) == ["j-1", "j-2"]


def test_the_smallest_victim_set_is_taken() -> None:
    d = driver(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}}))
    d.submit(job("j-1", "q", cpu=3, priority=100), job("j-2", "q", cpu=1, priority=100))
    d.cycle()
    d.clock = at(5)
    d.submit(job("j-3", "q", cpu=3, priority=1000))
    # Greedy takes j-2 first (newest), then j-1; j-2 is not needed once j-1 goes.
    assert [p.victim.workload.id for p in d.cycle().preempt] == ["j-1"]


def test_a_queue_reclaims_what_it_lent_from_the_borrowing_queue() -> None:
    d = driver(
        queue_doc("vision", cohort="research", flavors={"f": {"cpu": {"nominal": 2}}}),
        queue_doc("nlp", cohort="research", flavors={"f": {"cpu": {"nominal": 2}}}),
    )
    d.submit(*(job(f"j-{i}", "vision") for i in range(1, 5)))
    d.cycle()
    assert len(d.admitted) == 4  # 2 of its own, 2 borrowed from nlp
    d.clock = at(5)
    d.submit(job("j-9", "nlp", cpu=2))
    decisions = d.cycle(stop_victims=False)
    assert decisions.admit == []
    # Two victims, the most recently admitted of the borrower's (ties: by id, all admitted at T0).
    assert sorted(p.victim.workload.id for p in decisions.preempt) == ["j-3", "j-4"]
    assert decisions.preempt[0].reason == (
        "reclaimed by queue nlp for job j-9: it lends 2 cpu of flavor f to vision"
    )
    d.stop_victims(decisions)
    assert [a.workload.id for a in d.cycle().admit] == ["j-9"]
    assert quota_violations(d.engine.config, d.admitted.values()) == []


def test_reclaim_policies() -> None:
    for reclaim, preempted in (("never", 0), ("lower_priority", 0), ("any", 2)):
        d = driver(
            queue_doc("vision", cohort="c", flavors={"f": {"cpu": {"nominal": 2}}}),
            queue_doc("nlp", cohort="c", flavors={"f": {"cpu": {"nominal": 2}}}, reclaim=reclaim),
        )
        d.submit(*(job(f"j-{i}", "vision") for i in range(1, 5)))
        d.cycle()
        d.submit(job("j-9", "nlp", cpu=2))  # same priority as the borrowers
        assert len(d.cycle().preempt) == preempted, reclaim


def test_reclaim_only_takes_from_queues_that_borrow() -> None:
    d = driver(
        queue_doc("a", cohort="c", flavors={"f": {"cpu": {"nominal": 2}}}),
        queue_doc("b", cohort="c", flavors={"f": {"cpu": {"nominal": 2}}}),
        queue_doc("c", cohort="c", flavors={"f": {"cpu": {"nominal": 2}}}),
    )
    d.submit(job("j-1", "a", cpu=2), job("j-2", "b", cpu=4))  # b borrows c's 2
    d.cycle()
    d.submit(job("j-3", "c", cpu=2))
    assert [p.victim.workload.id for p in d.cycle().preempt] == ["j-2"]


def test_a_job_being_preempted_is_not_chosen_twice() -> None:
    d = driver(queue_doc("q", flavors={"f": {"cpu": {"nominal": 2}}}))
    d.submit(job("j-1", "q", cpu=1, priority=100), job("j-2", "q", cpu=1, priority=500))
    d.cycle()
    d.submit(job("j-3", "q", cpu=1, priority=1000), job("j-4", "q", cpu=1, priority=1000))
    first = d.cycle(stop_victims=False)
    assert [(p.victim.workload.id, p.preemptor_id) for p in first.preempt] == [("j-1", "j-3")]
    # j-3 waits for j-1; j-4 waits behind j-3 (only a queue's head preempts): nobody is
    # chosen again meanwhile.
    assert d.cycle(stop_victims=False).preempt == []
    assert d.engine.preempting() == {"j-1": "j-3"}
    d.stop_victims(first)
    third = d.cycle(stop_victims=False)
    assert [a.workload.id for a in third.admit] == ["j-3"]
    assert [(p.victim.workload.id, p.preemptor_id) for p in third.preempt] == [("j-2", "j-4")]


def test_what_preemption_frees_is_kept_for_the_preemptor() -> None:
    # a lends its 2 cores (b has none); a's own low job uses 1, so 1 is free to borrow.
    d = driver(
        queue_doc("a", cohort="c", flavors={"f": {"cpu": {"nominal": 2}}}),
        queue_doc("b", cohort="c", flavors={"f": {"cpu": {"nominal": 0}}}, reclaim="never"),
    )
    d.submit(job("j-1", "a", cpu=1, priority=100))
    d.cycle()
    d.submit(job("j-2", "a", cpu=2, priority=1000))
    first = d.cycle(stop_victims=False)
    assert [p.victim.workload.id for p in first.preempt] == ["j-1"]
    # b could borrow the free core now, but then j-2 would not fit once j-1 has stopped.
    d.submit(job("j-3", "b", cpu=1))
    assert d.cycle(stop_victims=False).admit == []
    d.stop_victims(first)
    assert [a.workload.id for a in d.cycle().admit] == ["j-2"]
    assert quota_violations(d.engine.config, d.admitted.values()) == []


# ---------------------------------------------------------------- backfill and backoff


def test_backfill_takes_jobs_that_end_before_the_head_starts() -> None:
    d = driver(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}}))
    d.submit(job("j-1", "q", cpu=3, runtime=1000))
    d.cycle()
    d.submit(
        job("j-2", "q", cpu=4, runtime=100),  # the head: waits for j-1 (t=1000)
        job("j-3", "q", cpu=1, runtime=900),  # ends before 1000: backfilled
        job("j-4", "q", cpu=1, runtime=2000),  # would delay j-2: waits
    )
    before = d.engine.report(T0).pending_of("j-2")
    assert before is not None and before.estimated_start == at(1000)
    assert [a.workload.id for a in d.cycle().admit] == ["j-3"]
    after = d.engine.report(T0)
    assert row(after, "j-2").estimated_start == at(1000)
    j4 = after.pending_of("j-4")
    assert j4 is not None and j4.reason.startswith("waiting for 1 cpu in flavor f")


def test_backfill_takes_jobs_that_fit_beside_the_head() -> None:
    d = driver(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}}))
    d.submit(job("j-1", "q", cpu=2, runtime=1000))
    d.cycle()
    d.submit(job("j-2", "q", cpu=3, runtime=100), job("j-3", "q", cpu=1), job("j-4", "q", cpu=1))
    # At 1000, j-2 takes 3 of 4: one core is left beside it, for a job of any length.
    assert [a.workload.id for a in d.cycle().admit] == ["j-3"]
    entry = d.engine.report(T0).pending_of("j-4")
    assert entry is not None
    assert entry.reason == (
        "fits now, but waits behind job j-2 so as not to delay its start (backfill takes only "
        "jobs that end before it or fit beside it)"
    )


def test_a_head_with_no_estimate_lets_nothing_past() -> None:
    d = driver(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}}))
    d.submit(job("j-1", "q", cpu=3))  # no run time: nobody knows when it ends
    d.cycle()
    d.submit(job("j-2", "q", cpu=4, runtime=10), job("j-3", "q", cpu=1, runtime=1))
    assert d.cycle().admit == []
    report = d.engine.report(T0)
    assert row(report, "j-2").estimated_start is None
    assert row(report, "j-2").estimate_basis == (
        "unknown: job j-1 ahead has no run time limit and no history"
    )
    assert row(report, "j-3").estimate_basis.startswith("unknown: behind job j-2")


def test_a_job_in_backoff_is_skipped_and_blocks_nobody() -> None:
    d = driver(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}}))
    d.submit(job("j-1", "q", cpu=4, not_before=at(60)), job("j-2", "q", cpu=2))
    assert [a.workload.id for a in d.cycle().admit] == ["j-2"]
    entry = d.engine.report(T0).pending_of("j-1")
    assert entry is not None
    assert entry.reason == "retrying after backoff, not before 2026-12-01T12:01:00Z"
    d.finish("j-2")
    d.clock = at(61)
    assert [a.workload.id for a in d.cycle().admit] == ["j-1"]


def test_a_backoff_ending_wakes_the_queue_without_any_other_change() -> None:
    d = driver(queue_doc("q", flavors=CPU4))
    d.submit(job("j-1", "q", not_before=at(30)))
    assert d.cycle().admit == []
    d.clock = at(31)
    assert [a.workload.id for a in d.cycle().admit] == ["j-1"]


# ---------------------------------------------------------------- fair share and order


def test_order_is_priority_then_order_then_id() -> None:
    d = driver(queue_doc("q", flavors={"f": {"cpu": {"nominal": 1}}}))
    d.submit(
        job("j-1", "q", priority=100, order=1),
        job("j-2", "q", priority=500, order=5),
        job("j-3", "q", priority=500, order=2),
    )
    report = d.engine.report(T0)
    assert [(p.job_id, p.position_in_queue) for p in report.pending] == [
        ("j-3", 1),
        ("j-2", 2),
        ("j-1", 3),
    ]
    assert report.pending[1].reason.endswith("; 1 job of its priority queued earlier ahead")
    assert report.pending[2].reason.endswith("; 2 jobs of higher priority ahead")
    assert [a.workload.id for a in d.cycle().admit] == ["j-3"]


def test_fair_share_goes_to_the_queue_with_the_lowest_weighted_share() -> None:
    lender = queue_doc("pool", cohort="c", flavors={"f": {"cpu": {"nominal": 6}}}, teams=[])
    heavy = queue_doc("heavy", cohort="c", flavors={"f": {"cpu": {"nominal": 0}}}, weight=2)
    light = queue_doc("light", cohort="c", flavors={"f": {"cpu": {"nominal": 0}}}, weight=1)
    d = driver(lender, heavy, light)
    d.submit(*(job(f"j-{i}", "heavy") for i in range(10)))
    d.submit(*(job(f"j-{i}", "light") for i in range(10, 20)))
    d.cycle()
    queues = sorted(a.workload.queue for a in d.admitted.values())
    assert queues.count("heavy") == 4 and queues.count("light") == 2


def test_the_same_input_gives_the_same_decisions() -> None:
    def run() -> list[tuple[str, str]]:
        d = driver(
            queue_doc("a", cohort="c", flavors={"f": {"cpu": {"nominal": 3}}}, weight=2),
            queue_doc("b", cohort="c", flavors={"f": {"cpu": {"nominal": 3}}}),
        )
        d.submit(
            *(
                job(
                    f"j-{i}",
                    "a" if i % 3 else "b",
                    cpu=1 + i % 2,
                    priority=(100, 500, 1000)[i % 3],
                    runtime=10.0 * i,
                )
                for i in range(1, 30)
            )
        )
        out = []
        for step in range(12):
            d.clock = at(step * 5)
            decisions = d.cycle()
            out += [("admit", a.workload.id) for a in decisions.admit]
            out += [("preempt", p.victim.workload.id) for p in decisions.preempt]
            for job_id in sorted(d.admitted)[:1]:
                d.finish(job_id)
        return out

    assert run() == run()


# ---------------------------------------------------------------- default and state


def test_the_default_config_admits_in_fifo_order_within_capacity() -> None:
    engine = QueueEngine(default_config({"cpu": 4, "memory": 8 * 2**30, "gpu": 0}))
    d = Driver(engine)
    team = engine.queue_of("anyone").name
    d.submit(
        job("j-1", team, cpu=2, team="anyone"),
        job("j-2", team, cpu=3, team="other"),  # does not fit: the head, nothing passes it
        job("j-3", team, cpu=1, team="anyone"),
    )
    assert [a.workload.id for a in d.cycle().admit] == ["j-1"]
    d.finish("j-1")
    assert sorted(a.workload.id for a in d.cycle().admit) == ["j-2", "j-3"]


def test_load_replaces_the_whole_state() -> None:
    engine = QueueEngine(config(queue_doc("q", flavors=CPU4)))
    engine.add_pending(job("j-1", "q"))
    engine.load(
        admitted=[Admission(workload=job("j-2", "q", cpu=4), flavor="f", admitted_at=T0)],
        pending=[job("j-3", "q")],
    )
    assert engine.pending_ids() == ["j-3"]
    assert [a.workload.id for a in engine.admitted()] == ["j-2"]
    assert engine.cycle(at(1)).admit == []
    engine.remove("j-2")
    assert [a.workload.id for a in engine.cycle(at(2)).admit] == ["j-3"]


def test_a_job_of_a_queue_no_longer_configured_is_reported_not_lost() -> None:
    engine = QueueEngine(config(queue_doc("q", flavors=CPU4)))
    engine.add_pending(job("j-1", "gone"))
    assert engine.cycle(T0).admit == []
    entry = engine.report(T0).pending_of("j-1")
    assert entry is not None and entry.reason == "its queue 'gone' is not in the configuration"


def test_the_report_for_a_team_shows_its_queue_and_only_its_jobs() -> None:
    d = driver(
        queue_doc("shared", teams=["a", "b"], flavors={"f": {"cpu": {"nominal": 1}}}),
        queue_doc("other", flavors=CPU4),
    )
    d.submit(
        job("j-1", "shared", team="a", runtime=60),
        job("j-2", "shared", team="b", runtime=60),
        job("j-3", "shared", team="a", runtime=60),
        job("j-4", "other"),
    )
    d.cycle()
    report = d.engine.report(T0, teams=["a"])
    assert [q.name for q in report.queues] == ["shared"]
    assert [(p.job_id, p.position_in_queue) for p in report.pending] == [("j-3", 2)]
    assert report.pending[0].estimated_start == at(120)
    assert report.pending[0].estimate_basis == (
        "when 1 running job end and 1 job ahead of it run, by declared maximum run time"
    )


def test_a_waiting_preemptor_queued_again_still_waits_for_its_victims() -> None:
    d = driver(queue_doc("q", flavors={"f": {"cpu": {"nominal": 1}}}))
    d.submit(job("j-1", "q", priority=100))
    d.cycle()
    d.submit(job("j-2", "q", priority=1000))
    first = d.cycle(stop_victims=False)
    assert len(first.preempt) == 1
    d.engine.add_pending(job("j-2", "q", priority=1000))  # the service reloads it, say
    assert d.cycle(stop_victims=False).preempt == []
    assert row(d.engine.report(T0), "j-2").reason == "waiting for 1 preempted job to stop"
