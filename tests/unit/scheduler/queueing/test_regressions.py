"""Regressions of the admission engine and its configuration from the issue-8 review: each test
failed before its fix."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plinth_common.errors import InvalidArgument
from services.scheduler.queueing.config import parse_config
from services.scheduler.queueing.engine import QueueEngine, preemptor_of
from services.scheduler.queueing.model import Admission
from tests.unit.scheduler.queueing.builders import (
    T0,
    Driver,
    config,
    job,
    queue_doc,
    quota_violations,
    status,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cpu_usage(engine: QueueEngine, queue: str) -> float:
    found = status(engine.report(T0), queue)
    return next(u.usage for u in found.resources if u.resource == "cpu")


# -- 2. the same job held twice ------------------------------------------------------------------


@FAST
@given(
    cpus=st.lists(st.integers(1, 3), min_size=1, max_size=8),
    stale=st.lists(st.integers(0, 7), max_size=8),
)
def test_a_held_job_fed_to_add_pending_again_is_never_admitted_twice(
    cpus: list[int], stale: list[int]
) -> None:
    d = Driver(QueueEngine(config(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}}))))
    d.submit(*(job(f"j-{i}", "q", cpu=c) for i, c in enumerate(cpus)))
    d.cycle()
    held = sorted(d.admitted)
    # A stale read hands the engine jobs it already admitted, as if they were still queued.
    for i in stale:
        if held:
            d.engine.add_pending(d.admitted[held[i % len(held)]].workload)
    for _ in range(2):
        d.cycle()  # Driver.cycle fails on a job admitted twice
    assert quota_violations(d.engine.config, d.admitted.values()) == []
    assert cpu_usage(d.engine, "q") == sum(a.workload.total()["cpu"] for a in d.admitted.values())


def test_an_admission_loaded_twice_is_held_once() -> None:
    engine = QueueEngine(config(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}})))
    adm = Admission(workload=job("j-1", "q", cpu=3), flavor="f", admitted_at=T0)
    engine.load(admitted=[adm, adm], pending=[job("j-2", "q", cpu=1)])
    assert cpu_usage(engine, "q") == 3
    assert [a.workload.id for a in engine.cycle(T0).admit] == ["j-2"]


# -- 15. two priority classes with one value -----------------------------------------------------


def test_two_priority_classes_with_the_same_value_are_refused_naming_the_second() -> None:
    document = {
        "priority_classes": [
            {"name": "low", "value": 100},
            {"name": "batch", "value": 100},
            {"name": "high", "value": 1000},
        ],
        "flavors": [{"name": "f"}],
        "cluster_queues": [queue_doc("q")],
        "default_queue": "nope",
    }
    with pytest.raises(InvalidArgument) as raised:
        parse_config(document)
    fields = dict(raised.value.violations)
    assert "priority_classes[1].value" in fields, fields
    assert "low" in fields["priority_classes[1].value"]
    assert "default_queue" in fields  # listed with the other problems


# -- 8. backfill goes by the longest a job may run, not its typical run time ---------------------


@pytest.mark.parametrize(("bound", "backfilled"), [(200.0, False), (80.0, True)])
def test_backfill_ahead_of_a_blocked_head_goes_by_the_runtime_bound(
    bound: float, backfilled: bool
) -> None:
    engine = QueueEngine(config(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}})))
    running = Admission(workload=job("j-1", "q", cpu=3, runtime=100), flavor="f", admitted_at=T0)
    head = job("j-2", "q", cpu=4)
    # Typically 50 s (a median), but it has run up to `bound`: past the head's start at 100 s
    # it would hold the cpu the head needs.
    candidate = dataclasses.replace(job("j-3", "q", cpu=1, runtime=50), runtime_bound_s=bound)
    engine.load(admitted=[running], pending=[head, candidate])
    admitted = [a.workload.id for a in engine.cycle(T0).admit]
    assert admitted == (["j-3"] if backfilled else []), admitted


# -- 7. preemptions under way survive a reload -------------------------------------------------


def test_a_reload_keeps_the_preemptions_under_way_and_preempts_no_more() -> None:
    cfg = config(queue_doc("q", flavors={"f": {"cpu": {"nominal": 4}}}))
    first = QueueEngine(cfg)
    low = [job(f"j-{i}", "q", cpu=2, priority=100) for i in (1, 2)]
    high = job("j-3", "q", cpu=2, priority=1000)
    first.load(
        admitted=[Admission(workload=w, flavor="f", admitted_at=T0) for w in low], pending=[]
    )
    first.add_pending(high)
    (preemption,) = first.cycle(T0).preempt
    victim = preemption.victim.workload.id
    assert preemptor_of(preemption.reason) == "j-3"

    # A restart (or a new configuration): the victim is still stopping.
    second = QueueEngine(cfg)
    second.load(
        admitted=[Admission(workload=w, flavor="f", admitted_at=T0) for w in low],
        pending=[high, job("j-4", "q", cpu=2, priority=1000)],
        stopping={victim: preemptor_of(preemption.reason)},
    )
    assert second.preempting() == {victim: "j-3"}
    decisions = second.cycle(T0)
    # The stopping victim is not preempted again, and j-3 still waits for it at the head.
    assert (decisions.preempt, decisions.admit) == ([], [])
    second.remove(victim)
    assert [a.workload.id for a in second.cycle(T0).admit] == ["j-3"]


# -- 3. an admission of a vanished queue still uses its flavor ------------------------------------


def test_an_admission_of_a_queue_no_longer_configured_counts_against_its_flavor() -> None:
    engine = QueueEngine(config(queue_doc("b", flavors={"f": {"cpu": {"nominal": 4}}})))
    gone = job("j-1", "gone", cpu=3, team="b")  # admitted to a queue since removed
    engine.load(
        admitted=[Admission(workload=gone, flavor="f", admitted_at=T0)],
        pending=[job("j-2", "b", cpu=2)],
    )
    assert engine.cycle(T0).admit == []  # 3 + 2 cpu would exceed the 4 the flavor has here
    assert cpu_usage(engine, "b") == 3
    engine.remove("j-1")
    assert [a.workload.id for a in engine.cycle(T0).admit] == ["j-2"]
