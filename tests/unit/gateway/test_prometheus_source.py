"""The Prometheus source of SLO counts against a small fake server speaking Prometheus's
``/api/v1/query_range`` JSON over real HTTP: the queries it sends, the 5-minute buckets it
builds (per scope), the same figures out of :func:`plinth_common.slo.evaluate` as from the
gateway's own buckets, and readable errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from plinth_common.errors import Unavailable
from plinth_common.slo import DEFAULT_SLOS, EventCounts, evaluate
from services.gateway.prometheus_source import PrometheusCounts, queries

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SLOS = {slo.name: slo for slo in DEFAULT_SLOS}


class FakePrometheus:
    def __init__(self) -> None:
        self.asked: list[dict[str, str]] = []
        self.answers: dict[str, dict[str, Any]] = {}

    async def query_range(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        self.asked.append(params)
        body = self.answers.get(params["query"])
        if body is None:
            return web.json_response(
                {"status": "error", "errorType": "bad_data", "error": "parse error"}, status=400
            )
        return web.json_response(body)


def matrix(*series: tuple[dict[str, str], list[tuple[datetime, float]]]) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {"metric": labels, "values": [[t.timestamp(), str(v)] for t, v in points]}
                for labels, points in series
            ],
        },
    }


@pytest_asyncio.fixture
async def prometheus() -> AsyncIterator[tuple[FakePrometheus, str]]:
    fake = FakePrometheus()
    app = web.Application()
    app.router.add_get("/api/v1/query_range", fake.query_range)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_counts_per_step_match_the_recorded_source(
    prometheus: tuple[FakePrometheus, str],
) -> None:
    fake, url = prometheus
    slo = SLOS["gateway-availability"]
    good_q, total_q = queries(slo)
    t1, t2 = NOW - timedelta(minutes=10), NOW - timedelta(minutes=5)
    # increase() extrapolates: fractional counts round to whole events.
    fake.answers[good_q] = matrix(({}, [(t1, 989.6), (t2, 970.0)]))
    fake.answers[total_q] = matrix(({}, [(t1, 990.2), (t2, 990.0)]))
    source = PrometheusCounts(url + "/")
    try:
        counts = await source.event_counts(slo, NOW - timedelta(days=28), NOW)
    finally:
        await source.close()
    # A point at t counts (t - 5m, t]: the bucket that starts 5 minutes earlier.
    assert counts == {
        "": [
            EventCounts(t1 - timedelta(minutes=5), 990, 990),
            EventCounts(t2 - timedelta(minutes=5), 970, 990),
        ]
    }
    (first, second) = fake.asked
    assert first["query"] == good_q and second["query"] == total_q
    assert first["step"] == "300s"
    assert float(first["end"]) == NOW.timestamp()
    assert float(first["start"]) == (NOW - timedelta(days=28, minutes=-5)).timestamp()
    # The figures are what the gateway's own buckets would give for the same events.
    status = evaluate(slo, counts[""], NOW)
    assert (status.good, status.total) == (1960, 1980)
    assert status.burn_rates["1h"] == pytest.approx((20 / 1980) / 0.001)
    # The selection is the recording rules': the gateway's job, no health checks.
    assert 'job="plinth-gateway"' in total_q and 'service!~"grpc' in total_q


async def test_scoped_slos_split_by_their_label(prometheus: tuple[FakePrometheus, str]) -> None:
    fake, url = prometheus
    slo = SLOS["queue-wait"]
    good_q, total_q = queries(slo)
    assert "by (team)" in total_q and 'le=~"600(' in good_q
    t = NOW - timedelta(minutes=30)
    fake.answers[good_q] = matrix(({"team": "ml"}, [(t, 9.0)]))
    fake.answers[total_q] = matrix(({"team": "ml"}, [(t, 10.0)]), ({"team": "cv"}, [(t, 2.0)]))
    source = PrometheusCounts(url)
    try:
        counts = await source.event_counts(slo, NOW - timedelta(days=1), NOW)
    finally:
        await source.close()
    start = t - timedelta(minutes=5)
    # cv had no good-series point: none of its waits were within 10 minutes.
    assert counts == {"ml": [EventCounts(start, 9, 10)], "cv": [EventCounts(start, 0, 2)]}


async def test_errors_are_unavailable_with_the_reason(
    prometheus: tuple[FakePrometheus, str],
) -> None:
    _, url = prometheus
    source = PrometheusCounts(url)
    try:
        with pytest.raises(Unavailable, match="parse error"):
            await source.event_counts(SLOS["job-start-success"], NOW - timedelta(hours=1), NOW)
    finally:
        await source.close()
    nowhere = PrometheusCounts("http://127.0.0.1:1")
    try:
        with pytest.raises(Unavailable, match="did not answer"):
            await nowhere.event_counts(SLOS["job-start-success"], NOW - timedelta(hours=1), NOW)
    finally:
        await nowhere.close()
