"""Traffic splits and canary rollback: the split's rules, SetTraffic through the reconciler
(versions loaded before traffic moves, the data plane pushed before anything unloads), the
events it records, rollback, and the SLO verdict on synthetic data-plane statistics."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import pytest

from plinth_common.auth import Role
from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.serving import domain
from services.serving.domain import DeploymentState, Slo
from services.serving.reconciler import Reconciler
from services.serving.store import DeploymentStore
from services.serving.traffic import CanaryGuard, TrafficWindows, WindowStats, breach
from tests.helpers import ADMIN, member
from tests.unit.serving.conftest import Serving
from tests.unit.serving.fakes import FakeModelServer
from tests.unit.serving.test_service import promote, serve

pytestmark = pytest.mark.asyncio(loop_scope="session")


# -- the split's rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shares", "problem"),
    [
        ([("3", 10), ("2", 80)], "sum to 100; v3=10 v2=80 sums to 90"),
        ([("3", 50), ("3", 50)], "version 3 is named twice"),
        ([("v3", 100)], "'v3' is no version number"),
        ([("3", 120), ("2", -20)], "120% is not between 0 and 100"),
        ([("1", 20), ("2", 20), ("3", 20), ("4", 20), ("5", 20)], "5 versions; a split names"),
        ([], "nothing sums to 0"),
    ],
)
async def test_a_malformed_split_is_refused_saying_what_is_wrong(
    shares: list[tuple[str, int]], problem: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        domain.check_split(shares)
    assert raised.value.field == "traffic"
    assert problem in raised.value.problem


async def test_versions_at_zero_percent_leave_the_split() -> None:
    assert domain.check_split([("3", 0), ("2", 100)]) == {"2": 100}


async def test_slo_and_limits_zeros_mean_the_defaults_and_bad_values_name_the_field() -> None:
    assert domain.check_slo(domain.UNSET_SLO) == Slo(
        max_error_rate_pct=1.0, max_p99_ms=500.0, window_s=60
    )
    with pytest.raises(InvalidArgument) as raised:
        domain.check_slo(Slo(max_error_rate_pct=150.0, max_p99_ms=0.0, window_s=0))
    assert raised.value.field == "slo.max_error_rate_percent"
    with pytest.raises(InvalidArgument) as raised:
        domain.check_limits(domain.Limits(max_concurrency=0, max_queue=10))
    assert raised.value.field == "limits.max_queue"


# -- SetTraffic through the reconciler ---------------------------------------------------------


async def test_a_canary_loads_before_it_takes_its_share_and_the_event_says_it_all(
    serving: Serving,
) -> None:
    await serve(serving, "diab", "1")
    shown = await serving.service.set_traffic(
        ADMIN, "diab", [("2", 10), ("1", 90)], reason="try v2"
    )
    assert shown.traffic == {"1": 90, "2": 10}
    assert shown.pending_traffic is None
    assert serving.models.loaded == {"diab__v1", "diab__v2"}
    # The data plane was told only once v2 had loaded, and was told the new split.
    assert serving.publisher.not_loaded == []
    assert serving.publisher.last("diab") == {"1": 90, "2": 10}
    change = serving.events.changes[-1]
    assert (change.traffic, change.previous) == ({"1": 90, "2": 10}, {"1": 100})
    assert (change.reason, change.actor) == ("SetTraffic: try v2", ADMIN.name)
    # The Python path splits by weight too.
    picked = Counter(serving.reconciler.route("diab").version for _ in range(4000))  # type: ignore[union-attr]
    assert 0.07 < picked["2"] / 4000 < 0.13


async def test_moving_shares_and_dropping_a_canary_unload_only_after_the_push(
    serving: Serving,
) -> None:
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("3", 10), ("1", 80)])
    loads = sum(1 for op, _ in serving.models.history if op == "load")
    shown = await serving.service.set_traffic(ADMIN, "diab", [("2", 30), ("1", 70)])
    assert shown.traffic == {"1": 70, "2": 30}
    # v2 kept answering (not loaded again); v3 unloaded once the new split was pushed.
    assert sum(1 for op, _ in serving.models.history if op == "load") == loads
    assert serving.models.loaded == {"diab__v1", "diab__v2"}
    assert serving.publisher.last("diab") == {"1": 70, "2": 30}


async def test_a_split_must_keep_the_serving_version(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    with pytest.raises(FailedPrecondition, match="must keep the serving version v1"):
        await serving.service.set_traffic(ADMIN, "diab", [("2", 50), ("3", 50)])


async def test_an_unknown_version_or_deployment_is_not_found_naming_it(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    serving.registry.missing_versions.add("9")
    with pytest.raises(NotFound, match="diabetes v9"):
        await serving.service.set_traffic(ADMIN, "diab", [("9", 10), ("1", 90)])
    with pytest.raises(NotFound, match="nope"):
        await serving.service.set_traffic(ADMIN, "nope", [("1", 100)])
    assert (await serving.service.get(ADMIN, "diab")).traffic == {"1": 100}


async def test_only_maintainers_move_traffic(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    with pytest.raises(PermissionDenied, match="maintainer"):
        await serving.service.set_traffic(
            member("dev", ml=Role.DEVELOPER), "diab", [("2", 10), ("1", 90)]
        )
    with pytest.raises(NotFound):
        await serving.service.set_traffic(
            member("other", vision=Role.MAINTAINER), "diab", [("2", 10), ("1", 90)]
        )


async def test_a_canary_that_fails_to_load_leaves_the_split_as_it_was(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    serving.models.failing["diab__v2"] = "stub process died"
    shown = await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    assert shown.traffic == {"1": 100}
    assert shown.pending_traffic is None
    assert "v2: stub process died" in shown.last_error
    assert shown.state is DeploymentState.READY
    assert serving.events.of("diab", "failed")[-1][0] == "2"
    assert serving.publisher.last("diab") == {"1": 100}


async def test_100_percent_on_another_version_rolls_it_out_like_a_promotion(
    serving: Serving,
) -> None:
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 20), ("1", 80)])
    shown = await serving.service.set_traffic(ADMIN, "diab", [("2", 100)], reason="v2 is good")
    assert (shown.serving_version, shown.traffic, shown.state) == (
        "2",
        {"2": 100},
        DeploymentState.READY,
    )
    assert serving.models.loaded == {"diab__v2"}
    change = serving.events.changes[-1]
    assert (change.traffic, change.previous) == ({"2": 100}, {"1": 80, "2": 20})
    assert change.reason == "SetTraffic: v2 is good"
    # The next promotion of the alias (newer than the pin) moves it on again.
    await promote(serving, "3", minute=10**6)
    await serving.reconcile()
    assert (await serving.service.get(ADMIN, "diab")).serving_version == "3"


async def test_a_promotion_replaces_the_split_with_the_new_version(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    await promote(serving, "3", minute=1)
    await serving.reconcile()
    shown = await serving.service.get(ADMIN, "diab")
    assert (shown.serving_version, shown.traffic) == ("3", {"3": 100})
    assert serving.models.loaded == {"diab__v3"}
    change = serving.events.changes[-1]
    assert change.previous == {"1": 90, "2": 10}
    assert change.reason == "rollout of v3 (production)"
    assert change.actor == "serving"
    assert serving.publisher.not_loaded == []


async def test_promoting_the_canary_reuses_its_loaded_model(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    loads = serving.models.history.count(("load", "diab__v2"))
    await promote(serving, "2", minute=1)
    await serving.reconcile()
    shown = await serving.service.get(ADMIN, "diab")
    assert (shown.serving_version, shown.traffic) == ("2", {"2": 100})
    assert serving.models.history.count(("load", "diab__v2")) == loads
    assert serving.models.loaded == {"diab__v2"}


async def test_a_rollback_gives_the_share_back_at_once_then_unloads_the_canary(
    serving: Serving,
) -> None:
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    assert await serving.reconciler.roll_back("diab", "canary v2 error rate 50%")
    shown = await serving.service.get(ADMIN, "diab")
    assert shown.traffic == {"1": 100}
    assert serving.publisher.last("diab") == {"1": 100}
    assert serving.models.loaded == {"diab__v1"}
    change = serving.events.changes[-1]
    assert change.reason == "rollback: canary v2 error rate 50%"
    assert (change.traffic, change.previous) == ({"1": 100}, {"1": 90, "2": 10})
    assert not await serving.reconciler.roll_back("diab", "again")


async def test_a_restart_restores_the_canaries(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 25), ("1", 75)])
    models = FakeModelServer()
    restarted = Reconciler(
        db=serving.db,
        store=DeploymentStore(),
        events=serving.events,
        repository=serving.repository,
        artifacts=serving.artifacts,
        models=models,
        registry=serving.registry,
    )
    await restarted.start()
    try:
        await asyncio.wait_for(restarted.wait_started(), timeout=5)
        assert models.loaded == {"diab__v1", "diab__v2"}
        [split] = restarted.splits()
        assert {b.version: b.percent for b in split.backends} == {"1": 75, "2": 25}
    finally:
        await restarted.stop()


async def test_a_data_plane_that_refuses_routes_is_pushed_again(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    serving.publisher.failing = True
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    serving.publisher.failing = False
    await serving.reconcile()
    assert serving.publisher.last("diab") == {"1": 90, "2": 10}


# -- the SLO verdict and the guard -------------------------------------------------------------

SLO = Slo(max_error_rate_pct=1.0, max_p99_ms=500.0, window_s=60)


async def test_breach_names_the_error_rate_or_p99_and_needs_enough_requests() -> None:
    bad = WindowStats(seconds=30, requests=200, errors=25, p99_ms=40)
    assert breach(bad, SLO) == "error rate 12.5% over 30s (200 requests) > SLO 1%"
    slow = WindowStats(seconds=30, requests=200, errors=0, p99_ms=900)
    assert breach(slow, SLO) == "p99 900 ms over 30s (200 requests) > SLO 500 ms"
    assert breach(WindowStats(seconds=30, requests=200, errors=2, p99_ms=40), SLO) is None
    assert breach(WindowStats(seconds=1, requests=5, errors=5, p99_ms=40), SLO) is None


@dataclass(frozen=True)
class Counters:
    requests: int
    errors: int
    p99_ms: float


async def test_windows_are_differences_of_samples_and_survive_a_counter_reset() -> None:
    windows = TrafficWindows()
    for t, requests, errors in [(0, 100, 0), (30, 400, 3), (60, 1000, 9), (90, 1300, 60)]:
        windows.observe(float(t), {"d/2": Counters(requests, errors, 10.0)})
    w = windows.window("d/2", 60, 90.0)
    assert (w.seconds, w.requests, w.errors) == (60, 900, 57)
    windows.observe(100.0, {"d/2": Counters(10, 0, 10.0)})  # the proxy restarted
    assert windows.window("d/2", 60, 100.0).requests == 0


async def test_a_window_never_shows_more_errors_than_requests() -> None:
    """The first sample's request count came from Triton (it counts requests the data plane
    records only once answered): the window's error rate stays at most 100%."""
    windows = TrafficWindows()
    windows.observe(0.0, {"d/3": Counters(105, 100, 10.0)})
    windows.observe(15.0, {"d/3": Counters(804, 801, 10.0)})
    w = windows.window("d/3", 60, 15.0)
    assert (w.requests, w.errors, w.error_rate_pct) == (699, 699, 100.0)


class Stats:
    def __init__(self) -> None:
        self.now: dict[str, Counters] = {}

    async def stats(self) -> dict[str, Counters]:
        return dict(self.now)


async def test_the_guard_rolls_back_a_failing_canary_and_leaves_a_healthy_one(
    serving: Serving,
) -> None:
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    stats, t = Stats(), [0.0]
    guard = CanaryGuard(stats=stats, canaries=serving.reconciler, clock=lambda: t[0])
    # What v2 answered before it was a canary is not held against it.
    stats.now = {"diab/1": Counters(1000, 0, 20.0), "diab/2": Counters(500, 400, 20.0)}
    assert await guard.check_once() == []
    t[0] = 20.0
    stats.now = {"diab/1": Counters(1900, 0, 20.0), "diab/2": Counters(600, 400, 20.0)}
    assert await guard.check_once() == []  # healthy over the window
    view = guard.view("diab", "2", 60)
    assert view is not None and view.rate == pytest.approx(5.0)
    t[0] = 35.0  # past half the 60 s SLO window: judged
    stats.now = {"diab/1": Counters(2800, 0, 20.0), "diab/2": Counters(700, 430, 20.0)}
    assert await guard.check_once() == ["diab"]
    shown = await serving.service.get(ADMIN, "diab")
    assert shown.traffic == {"1": 100}
    reason = serving.events.changes[-1].reason
    assert reason.startswith("rollback: canary v2 error rate 15.0% over 35s (200 requests)")
    assert serving.service.measured(shown).keys() == {"1"}


async def test_a_window_p99_comes_from_the_difference_of_the_data_planes_buckets() -> None:
    from services.serving.dataplane import VersionStats
    from services.serving.dataplane.tables import LATENCY_BOUNDS_MS

    def stats(requests: int, slow: int) -> VersionStats:
        buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        buckets[0], buckets[-2] = requests - slow, slow
        return VersionStats(requests=requests, errors=0, total_ms=0.0, buckets=tuple(buckets))

    windows = TrafficWindows()
    windows.observe(0.0, {"d/2": stats(10_000, 0)})  # a fast past, all-time p99 stays low
    windows.observe(10.0, {"d/2": stats(10_100, 50)})  # half of the last 100 were slow
    recent = windows.window("d/2", 60, 10.0)
    assert recent.requests == 100
    assert recent.p99_ms > LATENCY_BOUNDS_MS[-3]
    assert stats(10_100, 50).p99_ms < LATENCY_BOUNDS_MS[1]


async def test_splits_become_data_plane_routes_it_accepts() -> None:
    from services.serving.app import _route_specs
    from services.serving.dataplane.tables import check_routes

    split = domain.Split(
        deployment="diab",
        backends=(
            domain.Backend(version="2", triton_model="diab__v2", percent=90),
            domain.Backend(version="3", triton_model="diab__v3", percent=10),
        ),
        limits=domain.Limits(max_concurrency=8, max_queue=16),
    )
    [route] = _route_specs([split])
    check_routes([route])
    assert [(b.model, b.version, b.weight, b.shown_version) for b in route.backends] == [
        ("diab__v2", "1", 90, "2"),
        ("diab__v3", "1", 10, "3"),
    ]
    assert (route.max_concurrency, route.max_queue) == (8, 16)


class Engine:
    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}

    async def statistics(self, model: str) -> tuple[int, int]:
        return self.counts.get(model, (0, 0))


class Broken:
    async def stats(self) -> dict[str, Counters]:
        raise RuntimeError("haproxy is restarting")


async def test_merged_stats_take_the_proxys_errors_and_survive_it_failing() -> None:
    from services.serving.traffic import MergedStats

    engine, proxy = Engine(), Stats()
    models = {"diab/1": "diab__v1", "diab/2": "diab__v2"}
    merged = MergedStats(proxy=proxy, engine=engine, models=lambda: models)
    # The proxy counts server errors (trailers included); Triton's fail would add refusals of
    # malformed requests, so the proxy's count is the one used.
    proxy.now = {"diab/1": Counters(900, 0, 5.0), "diab/2": Counters(100, 60, 7.0)}
    engine.counts = {"diab__v1": (900, 0), "diab__v2": (40, 60)}
    got = await merged.stats()
    assert (got["diab/2"].requests, got["diab/2"].errors, got["diab/2"].p99_ms) == (100, 60, 7.0)
    assert breach(
        WindowStats(seconds=10, requests=got["diab/2"].requests, errors=60, p99_ms=7.0), SLO
    )
    # Without a working data plane (the Python path), Triton's counters alone.
    alone = MergedStats(proxy=Broken(), engine=engine, models=lambda: models)
    got = await alone.stats()
    assert (got["diab/2"].requests, got["diab/2"].errors) == (100, 60)
