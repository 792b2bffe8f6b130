"""SLO counts from a Prometheus server (``PLINTH_PROMETHEUS_URL``) instead of the gateway's own
buckets.

For each SLO it asks ``/api/v1/query_range`` for the good and total events of every 5-minute
step (``increase`` over the same selections as the recording rules of
:mod:`plinth_common.monitoring`, summed by the SLO's scope label), so :func:`plinth_common.slo.
evaluate` computes the same compliance, budget and burn rates from either source. Counts, not
the recorded ratios, because a window's compliance needs each step's weight; 28 days at 5
minutes is 8,064 points, under Prometheus's 11,000 per series.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from plinth_common.errors import Unavailable
from plinth_common.monitoring import SERVER_ERROR_CODES
from plinth_common.slo import EventCounts, Slo

STEP = timedelta(minutes=5)
FetchJson = Callable[[str, Mapping[str, str]], Awaitable[Any]]


def _le(threshold: float) -> str:
    # Clients write 600 as "600.0" and Prometheus 3 normalises it to "600": match both.
    if float(threshold).is_integer():
        return f'le=~"{int(threshold)}(\\\\.0)?"'
    return 'le=~"{}"'.format(repr(float(threshold)).replace(".", "\\\\."))


def queries(slo: Slo, step: str = "5m") -> tuple[str, str]:
    """(good, total) PromQL of ``slo`` per ``step``, summed by its scope label.

    Raises:
        ValueError: an SLO this module has no selection for.
    """
    by = f" by ({slo.per})" if slo.per else ""
    threshold = slo.target.threshold_s

    def inc(selector: str) -> str:
        return f"sum{by} (increase({selector}[{step}]))"

    if slo.name == "gateway-availability":
        select = 'job="plinth-gateway",service!~"grpc\\\\..*"'
        codes = "|".join(SERVER_ERROR_CODES)
        metric = "plinth_grpc_server_requests_total"
        total = inc(f"{metric}{{{select}}}")
        bad = inc(metric + "{" + select + f',code=~"{codes}"' + "}")
        # A step without errors has no error series: it counts as none, not as no data.
        return f"{total} - ({bad} or {total} * 0)", total
    if slo.name == "registry-alias-latency" and threshold is not None:
        select = 'job="plinth-registry",method="GetModelVersionByAlias"'
        metric = "plinth_grpc_server_request_duration_seconds"
        return (
            inc(f"{metric}_bucket{{{select},{_le(threshold)}}}"),
            inc(f"{metric}_count{{{select}}}"),
        )
    if slo.name == "queue-wait" and threshold is not None:
        metric = "plinth_scheduler_queue_wait_seconds"
        return inc(f"{metric}_bucket{{{_le(threshold)}}}"), inc(f"{metric}_count")
    if slo.name == "job-start-success":
        metric = "plinth_scheduler_job_starts_total"
        return inc(f'{metric}{{result!="failed"}}'), inc(metric)
    if slo.name in ("inference-availability", "inference-latency"):
        bad = (
            "plinth_serving_inference_errors_total"
            if slo.kind == "availability"
            else "plinth_serving_inference_slow_requests_total"
        )
        total = inc("plinth_serving_inference_requests_total")
        return f"{total} - ({inc(bad)} or {total} * 0)", total
    raise ValueError(f"no Prometheus selection for the SLO {slo.name!r}")


class PrometheusCounts:
    """An :class:`~plinth_common.slo.EventCountSource` over Prometheus's HTTP API.

    Args:
        base_url: the server, e.g. ``http://prometheus:9090``.
        fetch_json: GET ``url`` with query parameters, returning the decoded JSON (default:
            aiohttp; tests may pass their own).
        timeout_s: per query.
    """

    def __init__(
        self, base_url: str, *, fetch_json: FetchJson | None = None, timeout_s: float = 10.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._fetch_json = fetch_json
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def _get(self, path: str, params: Mapping[str, str]) -> Any:
        url = self.base_url + path
        if self._fetch_json is not None:
            return await self._fetch_json(url, params)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(
                url, params=dict(params), timeout=aiohttp.ClientTimeout(total=self._timeout_s)
            ) as response:
                return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise Unavailable(f"Prometheus at {self.base_url} did not answer: {exc}") from exc

    async def query_range(
        self, query: str, start: datetime, end: datetime, step: timedelta = STEP
    ) -> dict[str, dict[datetime, float]]:
        """A range query's series keyed by their labels (``k=v,...``; "" for none), each time ->
        value (NaN dropped).

        Raises:
            Unavailable: the server did not answer, or answered an error.
        """
        body = await self._get(
            "/api/v1/query_range",
            {
                "query": query,
                "start": f"{start.timestamp():.3f}",
                "end": f"{end.timestamp():.3f}",
                "step": f"{int(step.total_seconds())}s",
            },
        )
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error", body) if isinstance(body, dict) else body
            raise Unavailable(f"Prometheus refused {query!r}: {error}")
        found: dict[str, dict[datetime, float]] = {}
        for series in body.get("data", {}).get("result", []):
            labels = series.get("metric", {})
            key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")
            points = found.setdefault(key, {})
            for when, value in series.get("values", []):
                number = float(value)
                if not math.isnan(number):
                    points[datetime.fromtimestamp(float(when), UTC)] = number
        return found

    async def event_counts(
        self, slo: Slo, start: datetime, end: datetime
    ) -> Mapping[str, Sequence[EventCounts]]:
        """Good and total events per 5-minute step in ``[start, end)``, per scope."""
        good_q, total_q = queries(slo)
        # A point at t counts (t - 5m, t]: the bucket that starts at t - 5m.
        first = start + STEP
        goods = await self.query_range(good_q, first, end)
        totals = await self.query_range(total_q, first, end)
        result: dict[str, list[EventCounts]] = {}
        for key, points in totals.items():
            scope = key.partition("=")[2] if slo.per else ""
            good_points = goods.get(key, {})
            rows: list[EventCounts] = []
            for when in sorted(points):
                total = max(round(points[when]), 0)
                good = min(max(round(good_points.get(when, 0.0)), 0), total)
                if total and start <= when - STEP < end:
                    rows.append(EventCounts(when - STEP, good, total))
            if rows:
                result[scope] = rows
        return result

    async def close(self) -> None:
        """Closes the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
