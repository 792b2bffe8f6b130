"""The platform monitor on a hand-checked synthetic history: scrapes of a fake gateway and
registry (text as prometheus-client writes it), stored in real SQLite through the gateway's
migrations, turned into compliance, budget, burn rates and alerts; a restart mid-way; pruning;
the report's quantiles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from plinth_common.db import Database
from plinth_common.slo import DEFAULT_SLOS, Target, configure
from services.gateway.app import MIGRATIONS
from services.gateway.monitor import (
    PlatformMonitor,
    ScrapeTarget,
    counter_deltas,
    histogram_quantile,
    parse_exposition,
    parse_since,
    sli_increments,
)
from services.gateway.monitor_store import SqlMonitorStore

GATEWAY = ScrapeTarget("gateway", "http://gw/metrics")
REGISTRY = ScrapeTarget("registry", "http://reg/metrics")


def gateway_text(ok: int, internal: int, health: int, created: float = 1.0) -> str:
    name = "plinth_grpc_server_requests_total"
    svc = "plinth.scheduler.v1.SchedulerService"
    return "\n".join(
        [
            f"# TYPE {name} counter",
            f'{name}{{service="{svc}",method="GetJob",code="OK"}} {ok}.0',
            f'{name}{{service="{svc}",method="GetJob",code="NOT_FOUND"}} 3.0',
            f'{name}{{service="{svc}",method="GetJob",code="INTERNAL"}} {internal}.0',
            f'{name}{{service="grpc.health.v1.Health",method="Check",code="UNAVAILABLE"}} {health}.0',
            "# TYPE plinth_grpc_server_requests_created gauge",
            f'plinth_grpc_server_requests_created{{service="{svc}",method="GetJob",code="OK"}} {created}',
            "# TYPE plinth_events_outbox_backlog gauge",
            f"plinth_events_outbox_backlog {ok % 7}.0",
            "",
        ]
    )


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlMonitorStore]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    await db.migrate(MIGRATIONS)
    yield SqlMonitorStore(db)
    await db.engine.dispose()


async def test_hand_checked_history_through_the_buckets(store: SqlMonitorStore) -> None:
    clock = Clock(datetime(2026, 12, 1, 12, 0, 10, tzinfo=UTC))
    pages: dict[str, str] = {}

    async def fetch(url: str) -> str:
        if url not in pages:
            raise ConnectionRefusedError("connection refused")
        return pages[url]

    monitor = PlatformMonitor([GATEWAY, REGISTRY], store, fetch=fetch, clock=clock)
    # 12:00:10 the baseline (what came before belongs to no known minute).
    pages[GATEWAY.url] = gateway_text(ok=1000, internal=5, health=50)
    await monitor.scrape_once()
    # 12:01:10: 990 good calls (health checks are not the users' calls).
    clock.now += timedelta(minutes=1)
    pages[GATEWAY.url] = gateway_text(ok=1990, internal=5, health=60)
    await monitor.scrape_once()
    # 12:02:10: the gateway restarted; INTERNAL grew past its old value, yet all 20 are new.
    clock.now += timedelta(minutes=1)
    pages[GATEWAY.url] = gateway_text(ok=8, internal=20, health=1, created=2.0)
    await monitor.scrape_once()
    # 12:02:40: 980 good calls more, in the same minute's bucket.
    clock.now += timedelta(seconds=30)
    pages[GATEWAY.url] = gateway_text(ok=988, internal=20, health=2, created=2.0)
    await monitor.scrape_once()

    counts = await store.slo_counts(
        "gateway-availability", clock.now - timedelta(days=1), clock.now
    )
    assert [(c.start.minute, c.good, c.total) for c in counts[""]] == [
        (1, 990, 990),
        (2, 8 + 3 + 980, 8 + 3 + 20 + 980),  # NOT_FOUND is the caller's fault: good
    ]

    clock.now = datetime(2026, 12, 1, 12, 3, tzinfo=UTC)
    status = await monitor.status()
    gateway = next(s for s in status.slos if s.slo.name == "gateway-availability")
    # 1981 good of 2001; budget 0.1% of 2001 = 2.001 bad calls; 20 spent.
    assert (gateway.good, gateway.total) == (1981, 2001)
    assert gateway.compliance == pytest.approx(1981 / 2001)
    assert gateway.budget_remaining == pytest.approx(1 - 20 / 2.001)
    assert gateway.burn_rates["5m"] == pytest.approx((20 / 2001) / 0.001)  # 9.995
    assert gateway.burn_rates["1h"] == pytest.approx(9.995, abs=1e-3)
    # 14.4x over 1 h does not hold; 6x over 6 h and 30 m does (a page), and the tickets.
    assert gateway.alerts == ("page", "ticket")
    assert not gateway.met
    # The registry never answered: down, with the reason; its SLO shows "no data".
    components = {c.name: c for c in status.components}
    assert components["gateway"].up and not components["registry"].up
    assert "refused" in components["registry"].error
    registry = next(s for s in status.slos if s.slo.name == "registry-alias-latency")
    assert registry.compliance is None and registry.met

    # 12:06:30: the 5 m window holds only 12:02's bucket: 20 bad of 1011.
    clock.now = datetime(2026, 12, 1, 12, 6, 30, tzinfo=UTC)
    later = next(s for s in (await monitor.status()).slos if s.slo.name == "gateway-availability")
    assert later.burn_rates["5m"] == pytest.approx((20 / 1011) / 0.001)  # 19.78
    assert later.burn_rates["1h"] == pytest.approx(9.995, abs=1e-3)

    # 29 days on, both buckets are past the 28-day window and the alert windows: pruned.
    clock.now += timedelta(days=29)
    assert await monitor.prune() == 2
    assert (
        await store.slo_counts("gateway-availability", clock.now - timedelta(days=60), clock.now)
        == {}
    )


def test_latency_slis_take_the_bucket_at_each_scopes_threshold() -> None:
    slos = configure({"queue-wait": {"overrides": {"ml": {"objective": 0.9, "threshold_s": 300}}}})
    duration = "plinth_grpc_server_request_duration_seconds"
    wait = "plinth_scheduler_queue_wait_seconds"
    registry = {
        (f"{duration}_bucket", (("le", "0.025"), ("method", "GetModelVersionByAlias"))): 90.0,
        (f"{duration}_bucket", (("le", "0.05"), ("method", "GetModelVersionByAlias"))): 97.0,
        (f"{duration}_bucket", (("le", "+Inf"), ("method", "GetModelVersionByAlias"))): 100.0,
        (f"{duration}_count", (("method", "GetModelVersionByAlias"),)): 100.0,
        (f"{duration}_count", (("method", "GetModelVersion"),)): 50.0,
    }
    assert sli_increments("registry", registry, slos) == {("registry-alias-latency", ""): (97, 100)}
    scheduler = {
        (f"{wait}_bucket", (("le", "300.0"), ("queue", "q"), ("team", "ml"))): 6.0,
        (f"{wait}_bucket", (("le", "600.0"), ("queue", "q"), ("team", "ml"))): 8.0,
        (f"{wait}_count", (("queue", "q"), ("team", "ml"))): 10.0,
        (f"{wait}_bucket", (("le", "300.0"), ("queue", "q"), ("team", "cv"))): 1.0,
        (f"{wait}_bucket", (("le", "600.0"), ("queue", "q"), ("team", "cv"))): 4.0,
        (f"{wait}_count", (("queue", "q"), ("team", "cv"))): 4.0,
        ("plinth_scheduler_job_starts_total", (("result", "started"),)): 9.0,
        ("plinth_scheduler_job_starts_total", (("result", "failed"),)): 1.0,
    }
    assert sli_increments("scheduler", scheduler, slos) == {
        ("queue-wait", "ml"): (6, 10),  # ml's own 5-minute target
        ("queue-wait", "cv"): (4, 4),  # the default 10 minutes
        ("job-start-success", ""): (9, 10),
    }
    assert slos[2].target_for("ml") == Target(objective=0.9, threshold_s=300.0)
    # The same counters scraped from another component count for nothing.
    assert sli_increments("gateway", scheduler, DEFAULT_SLOS) == {}


def test_deltas_ignore_gauges_and_count_new_series() -> None:
    before = parse_exposition(gateway_text(ok=10, internal=0, health=0))
    after = parse_exposition(gateway_text(ok=12, internal=1, health=0))
    deltas = counter_deltas(before, after)
    assert sorted((dict(k[1])["code"], v) for k, v in deltas.items()) == [
        ("INTERNAL", 1.0),
        ("OK", 2.0),
    ]
    assert not any("backlog" in name for name, _ in after)


def test_quantiles_as_prometheus_computes_them() -> None:
    # 100 waits: 50 within 60 s, 90 within 300 s, all within 600 s.
    buckets = {"60.0": 50.0, "300.0": 90.0, "600.0": 100.0, "+Inf": 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(60.0)
    assert histogram_quantile(0.9, buckets) == pytest.approx(300.0)
    assert histogram_quantile(0.95, buckets) == pytest.approx(450.0)
    assert histogram_quantile(0.99, {"0.1": 0.0, "+Inf": 3.0}) == pytest.approx(0.1)
    assert histogram_quantile(0.5, {"1.0": 0.0, "+Inf": 0.0}) is None


async def test_report_per_team_from_stored_buckets(store: SqlMonitorStore) -> None:
    clock = Clock(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    monitor = PlatformMonitor([], store, clock=clock)
    minute = datetime(2026, 12, 1, 11, 0, tzinfo=UTC)
    await store.add(
        minute,
        {},
        {
            ("jobs_finished", "ml|succeeded"): 9,
            ("jobs_finished", "ml|failed"): 1,
            ("jobs_finished", "ml|cancelled"): 4,
            ("jobs_finished", "cv|failed"): 2,
            ("queue_wait_bucket", "ml|60.0"): 5,
            ("queue_wait_bucket", "ml|600.0"): 10,
            ("queue_wait_bucket", "ml|+Inf"): 10,
            ("inference_bucket", "fraud|0.05"): 99,
            ("inference_bucket", "fraud|0.1"): 100,
            ("inference_bucket", "fraud|+Inf"): 100,
            ("registry_calls", "GetModelVersionByAlias"): 1200,
        },
    )
    # A second scrape in the same minute adds to its bucket.
    await store.add(minute, {}, {("registry_calls", "GetModelVersionByAlias"): 34})
    # Eight days ago: outside --since 7d.
    await store.add(minute - timedelta(days=8), {}, {("jobs_finished", "ml|failed"): 50})

    report = await monitor.report(parse_since("7d"))
    assert [(j.team, j.succeeded, j.failed, j.cancelled) for j in report.jobs] == [
        ("cv", 0, 2, 0),
        ("ml", 9, 1, 4),
    ]
    assert report.jobs[1].success_rate == pytest.approx(0.9)
    assert report.queue_wait["ml"] == (pytest.approx(60.0), pytest.approx(60 + 540 * 4 / 5))
    assert report.endpoint_p99["fraud"] == pytest.approx(0.05)
    assert report.registry_calls == {"GetModelVersionByAlias": 1234}
    only_cv = await monitor.report(timedelta(days=7), teams=["cv"])
    assert [j.team for j in only_cv.jobs] == ["cv"] and only_cv.queue_wait == {}
    with pytest.raises(ValueError, match="7d"):
        parse_since("a week")
