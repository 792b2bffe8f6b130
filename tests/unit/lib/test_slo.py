"""SLO compliance, error budget and burn rates over hand-checked synthetic histories (the
arithmetic is written next to each expectation), the multi-window alert policy, per-scope
targets, and the configuration's checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from plinth_common.errors import InvalidArgument
from plinth_common.slo import (
    BURN_RATE_ALERTS,
    DEFAULT_SLOS,
    EventCounts,
    RecordedCounts,
    configure,
    evaluate,
    evaluate_all,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)
SLOS = {slo.name: slo for slo in DEFAULT_SLOS}
GATEWAY = SLOS["gateway-availability"]


def _bucket(ago: timedelta, total: int, bad: int) -> EventCounts:
    return EventCounts(NOW - ago, total - bad, total)


def test_the_defaults_are_the_issues() -> None:
    figures = {
        slo.name: (slo.component, slo.kind, slo.target.objective, slo.target.threshold_s, slo.per)
        for slo in DEFAULT_SLOS
    }
    assert figures == {
        "gateway-availability": ("gateway", "availability", 0.999, None, ""),
        "registry-alias-latency": ("registry", "latency", 0.99, 0.05, ""),
        "queue-wait": ("scheduler", "latency", 0.90, 600.0, "team"),
        "job-start-success": ("scheduler", "availability", 0.99, None, ""),
        "inference-availability": ("serving", "availability", 0.999, None, "deployment"),
        "inference-latency": ("serving", "latency", 0.99, 0.1, "deployment"),
    }
    assert {slo.window for slo in DEFAULT_SLOS} == {timedelta(days=28)}
    assert [(a.severity, a.long, a.short, a.factor) for a in BURN_RATE_ALERTS] == [
        ("page", timedelta(hours=1), timedelta(minutes=5), 14.4),
        ("page", timedelta(hours=6), timedelta(minutes=30), 6.0),
        ("ticket", timedelta(days=1), timedelta(hours=2), 3.0),
        ("ticket", timedelta(days=3), timedelta(hours=6), 1.0),
    ]


def test_a_month_with_a_recent_incident_hand_checked() -> None:
    # Gateway availability, objective 99.9%: the budget is 0.1% of the window's requests.
    history = [
        # Outside the 28-day window (it starts before NOW - 28 d): ignored, however bad.
        _bucket(timedelta(days=28, minutes=1), total=1_000_000, bad=1_000_000),
        # Days 28 back (the window's first instant, included) to 2 back: 27 quiet days of
        # 100 000 requests with 50 failures each -> 2 700 000 requests, 1 350 failures.
        *(_bucket(timedelta(days=d), total=100_000, bad=50) for d in range(2, 29)),
        _bucket(timedelta(hours=20), total=50_000, bad=100),  # in 1 d, not in 6 h
        _bucket(timedelta(hours=3), total=20_000, bad=0),  # in 6 h, not in 2 h
        _bucket(timedelta(minutes=50), total=6_000, bad=60),  # in 1 h, not in 30 min
        _bucket(timedelta(minutes=4), total=1_000, bad=20),  # in every window
        _bucket(timedelta(0), total=999, bad=999),  # starts at NOW: not yet in any window
    ]
    status = evaluate(GATEWAY, history, NOW)

    # total = 2 700 000 + 50 000 + 20 000 + 6 000 + 1 000 = 2 777 000
    # bad   =     1 350 +    100 +      0 +    60 +    20 =     1 530
    assert (status.total, status.total - status.good) == (2_777_000, 1_530)
    # compliance = 1 - 1 530 / 2 777 000 = 1 - 0.000550954... = 0.999449046...
    assert status.compliance == pytest.approx(0.999449046, abs=1e-9)
    assert status.met
    # budget = 0.001 * 2 777 000 = 2 777 failures; 1 530 spent -> 1 - 1530/2777 = 0.449045...
    assert status.budget_remaining == pytest.approx(0.4490457, abs=1e-6)
    # burn rate = (bad / total in the window) / 0.001
    assert status.burn_rates == pytest.approx(
        {
            "5m": 20.0,  # 20 / 1 000 = 2%
            "30m": 20.0,  # the same bucket
            "1h": 11.428571,  # (60 + 20) / (6 000 + 1 000) = 80 / 7 000
            "2h": 11.428571,  # nothing more within 2 h
            "6h": 2.962963,  # 80 / 27 000
            "1d": 2.337662,  # 180 / 77 000
            "3d": 1.010830,  # (180 + 2 * 50) / (77 000 + 2 * 100 000) = 280 / 277 000
        }
    )
    # page 1 h & 5 min > 14.4? 11.4: no.   page 6 h & 30 min > 6? 2.96: no.
    # ticket 1 d & 2 h > 3? 2.34: no.      ticket 3 d & 6 h > 1? 1.011 and 2.96: yes.
    assert status.alerts == ("ticket",)


def test_a_fresh_outage_pages_and_clears_once_the_short_window_recovers() -> None:
    burning = [
        _bucket(timedelta(minutes=30), total=10_000, bad=200),
        _bucket(timedelta(minutes=2), total=1_000, bad=20),
    ]
    # 1 h: 220 / 11 000 = 2% -> 20x; 5 min: 20 / 1 000 = 2% -> 20x; both above 14.4.
    # 6 h and 30 min (the 30-min bucket starts exactly at NOW - 30 min: inside): 20x > 6.
    assert evaluate(GATEWAY, burning, NOW).alerts == ("page", "ticket")
    recovered = [burning[0], _bucket(timedelta(minutes=2), total=1_000, bad=0)]
    status = evaluate(GATEWAY, recovered, NOW)
    # 1 h: 200 / 11 000 -> 18.2x still, but 5 min: 0 / 1 000 -> 0x: the fast page clears;
    # 6 h & 30 min: 18.2x > 6 both: the slow page holds.
    assert status.burn_rates["1h"] == pytest.approx(18.181818)
    assert status.burn_rates["5m"] == 0
    assert status.alerts == ("page", "ticket")
    # 31 minutes on, with a clean minute just recorded: the bad bucket (61 min old) is out of
    # 1 h and 30 min, so both pages clear; 1 d & 2 h: 200 / 12 000 -> 16.7x > 3: the ticket stays.
    clean = EventCounts(NOW + timedelta(minutes=30), 1_000, 1_000)
    later = evaluate(GATEWAY, [*recovered, clean], NOW + timedelta(minutes=31))
    assert later.burn_rates["30m"] == 0
    assert later.burn_rates["1h"] == 0
    assert later.burn_rates["2h"] == pytest.approx(16.666667)
    assert later.alerts == ("ticket",)


def test_no_events_is_no_figure_and_an_untouched_budget() -> None:
    status = evaluate(GATEWAY, [], NOW)
    assert status.compliance is None
    assert status.budget_remaining == 1.0
    assert status.met
    assert set(status.burn_rates.values()) == {None}
    assert status.alerts == ()


async def test_queue_wait_is_held_per_team_from_recorded_events() -> None:
    recorded = RecordedCounts(timedelta(minutes=5))
    queue_wait = SLOS["queue-wait"]
    # Team a: 10 jobs, 9 admitted within 10 min.  Team b: 4 jobs, 2 within 10 min.
    for minute in range(10):
        recorded.record(
            "queue-wait", NOW - timedelta(hours=2, minutes=minute), good=minute != 3, scope="a"
        )
    recorded.record("queue-wait", NOW - timedelta(days=1), good=True, scope="b", n=2)
    recorded.record("queue-wait", NOW - timedelta(days=1), good=False, scope="b", n=2)
    recorded.record("gateway-availability", NOW - timedelta(hours=1), good=False)  # other SLO

    statuses = await evaluate_all([queue_wait], recorded, NOW)

    by_team = {s.scope: s for s in statuses}
    assert set(by_team) == {"a", "b"}
    a, b = by_team["a"], by_team["b"]
    # a: 9 / 10 = 0.90 meets 90% exactly; the budget, 10% of 10 jobs = 1, is spent: 1 - 1/1 = 0.
    assert (a.good, a.total, a.compliance, a.met) == (9, 10, 0.9, True)
    assert a.budget_remaining == pytest.approx(0.0)
    # b: 2 / 4 = 0.5; budget 10% of 4 = 0.4 late jobs, 2 late: 1 - 2/0.4 = -4 (overspent 5x).
    assert (b.compliance, b.met) == (0.5, False)
    assert b.budget_remaining == pytest.approx(-4.0)
    # b's late jobs were a day ago: the 1 d window holds them, the 6 h window does not.
    assert b.burn_rates["1d"] == pytest.approx(5.0)  # 0.5 / 0.1
    assert b.burn_rates["6h"] is None


def test_a_deployment_sets_its_own_latency_target() -> None:
    slos = configure(
        {
            "inference-latency": {
                "threshold_s": 0.2,
                "overrides": {"fraud": {"objective": 0.995, "threshold_s": 0.05}},
            },
            "gateway-availability": {"objective": 0.9995, "window_days": 30},
        }
    )
    by_name = {slo.name: slo for slo in slos}
    latency = by_name["inference-latency"]
    assert latency.target.threshold_s == 0.2
    assert latency.target_for("fraud").objective == 0.995
    assert latency.target_for("fraud").threshold_s == 0.05
    assert latency.target_for("other").objective == 0.99
    assert by_name["gateway-availability"].window == timedelta(days=30)
    # The fraud deployment: 1 000 requests, 4 slow -> 99.6% >= 99.5%, met; the budget of
    # 0.5% * 1 000 = 5 slow requests has 1 left: 1 - 4/5 = 0.2.
    status = evaluate(latency, [_bucket(timedelta(hours=1), 1_000, 4)], NOW, scope="fraud")
    assert status.met
    assert status.budget_remaining == pytest.approx(0.2)
    # The same history under the default 99%: budget 10, 4 spent -> 0.6 left.
    assert evaluate(latency, [_bucket(timedelta(hours=1), 1_000, 4)], NOW).budget_remaining == (
        pytest.approx(0.6)
    )


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"nope": {}}, "slos"),
        ({"gateway-availability": {"objective": 1.5}}, "gateway-availability.objective"),
        ({"gateway-availability": {"threshold_s": 1}}, "gateway-availability.threshold_s"),
        ({"queue-wait": {"threshold_s": 0}}, "queue-wait.threshold_s"),
        ({"queue-wait": {"colour": "red"}}, "queue-wait"),
        ({"job-start-success": {"overrides": {"x": {}}}}, "job-start-success.overrides"),
        ({"job-start-success": {"window_days": 0}}, "job-start-success.window_days"),
    ],
)
def test_a_bad_setting_names_its_field(settings: dict[str, dict[str, object]], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        configure(settings)
    assert caught.value.field == field


def test_counts_must_be_consistent() -> None:
    with pytest.raises(ValueError, match="good <= total"):
        EventCounts(NOW, 3, 2)
