"""``plinth status`` (with the SLO table) and ``plinth report`` against an in-test gateway: a
real gRPC server answering ``PlatformService`` from a real :class:`PlatformMonitor` (recorded
counts in memory, the gateway's own protobuf conversion), and a tiny HTTP ``/healthz``."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common import errors as domain
from plinth_common.rich_status import status_of
from plinth_common.slo import EventCounts, RecordedCounts
from plinth_sdk import NotFound, Plinth, cli
from services.gateway.monitor import PlatformMonitor, ReportKey, ScrapeTarget, parse_since
from services.gateway.monitor_servicer import report_to_proto, status_to_proto

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class MemoryStore:
    """The monitor's buckets in a dict (the SQL store is tested in tests/unit/gateway)."""

    def __init__(self) -> None:
        self.figures: dict[tuple[str, str, datetime], float] = defaultdict(float)

    async def add(
        self,
        minute: datetime,
        slis: Mapping[tuple[str, str], tuple[int, int]],
        figures: Mapping[ReportKey, float],
    ) -> None:
        for (figure, key), value in figures.items():
            self.figures[(figure, key, minute)] += value

    async def slo_counts(
        self, slo: str, start: datetime, end: datetime
    ) -> dict[str, list[EventCounts]]:
        return {}

    async def figure_sums(self, figure: str, start: datetime, end: datetime) -> dict[str, float]:
        found: dict[str, float] = defaultdict(float)
        for (name, key, minute), value in self.figures.items():
            if name == figure and start <= minute < end:
                found[key] += value
        return dict(found)

    async def prune(self, before: datetime) -> int:
        return 0


class FakePlatform(gateway_pb2_grpc.PlatformServiceServicer):
    def __init__(self, monitor: PlatformMonitor) -> None:
        self.monitor = monitor
        self.requests: list[gateway_pb2.GetReportRequest] = []

    def GetPlatformStatus(
        self, request: gateway_pb2.GetPlatformStatusRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.PlatformStatus:
        return status_to_proto(asyncio.run(self.monitor.status()))

    def GetReport(
        self, request: gateway_pb2.GetReportRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.PlatformReport:
        self.requests.append(request)
        if request.team == "secret":
            status = status_of(
                domain.NotFound("team", "secret"),
                code=grpc.StatusCode.NOT_FOUND,
                domain="gateway.plinth",
            )
            context.abort_with_status(rpc_status.to_status(status))
        try:
            since = parse_since(request.since)
        except ValueError as exc:
            status = status_of(
                domain.InvalidArgument("since", str(exc)),
                code=grpc.StatusCode.INVALID_ARGUMENT,
                domain="gateway.plinth",
            )
            context.abort_with_status(rpc_status.to_status(status))
        found = asyncio.run(self.monitor.report(since, team=request.team))
        return report_to_proto(found)


class Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(
            {
                "status": "SERVING",
                "services": {"gateway": "SERVING", "scheduler": "SERVING"},
                "supervisor": {
                    "services": {"scheduler": {"state": "running", "restarts": 2, "pid": 7}}
                },
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Gateway:
    address: str
    http: str
    platform: FakePlatform

    def run(self, *args: str) -> int:
        return cli.main(["--gateway", self.address, *args])


def _history() -> tuple[RecordedCounts, MemoryStore]:
    counts = RecordedCounts()
    # Gateway: 97 good calls a minute for 100 minutes, and 3 failed a minute in the last 10.
    for minute in range(100):
        when = NOW - timedelta(minutes=minute + 1)
        counts.record("gateway-availability", when, good=True, n=97)
        counts.record("gateway-availability", when, good=False, n=3 if minute < 10 else 0)
    counts.record("queue-wait", NOW - timedelta(hours=2), good=True, scope="ml", n=19)
    counts.record("queue-wait", NOW - timedelta(hours=2), good=False, scope="ml", n=1)
    store = MemoryStore()
    day_ago = NOW - timedelta(days=1)
    for key, value in {
        ("jobs_finished", "ml|succeeded"): 19.0,
        ("jobs_finished", "ml|failed"): 1.0,
        ("jobs_finished", "cv|cancelled"): 3.0,
        ("queue_wait_bucket", "ml|60.0"): 10.0,
        ("queue_wait_bucket", "ml|300.0"): 20.0,
        ("queue_wait_bucket", "ml|+Inf"): 20.0,
        ("inference_bucket", "fraud|0.025"): 990.0,
        ("inference_bucket", "fraud|0.05"): 1000.0,
        ("inference_bucket", "fraud|+Inf"): 1000.0,
        ("registry_calls", "GetModelVersionByAlias"): 1500.0,
        ("registry_calls", "SearchModels"): 20.0,
    }.items():
        store.figures[(key[0], key[1], day_ago)] = value
    return counts, store


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.delenv("PLINTH_GATEWAY", raising=False)
    counts, store = _history()
    monitor = PlatformMonitor(
        [ScrapeTarget("gateway", "http://gw/metrics")], store, counts=counts, clock=lambda: NOW
    )
    platform = FakePlatform(monitor)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_PlatformServiceServicer_to_server(platform, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield Gateway(f"127.0.0.1:{port}", f"http://127.0.0.1:{http.server_port}", platform)
    finally:
        http.shutdown()
        http.server_close()
        server.stop(grace=None)


def test_status_shows_every_slo_with_its_budget_and_burn(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("status", "--http", gateway.http) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Plinth is SERVING"
    scheduler = next(line for line in lines if line.startswith("scheduler"))
    assert scheduler.split()[:4] == ["scheduler", "SERVING", "running", "2"]
    assert "SLOs (recorded by the gateway)" in out
    row = next(line for line in lines if line.startswith("gateway-availability"))
    # 9,700 good of 9,730: 99.692%; budget 0.1% of 9,730 = 9.73 calls, 30 spent: -208.3%.
    # 1 h: 30 bad of 5,850 = 0.513% = 5.13x; 1 d (and 2 h, 6 h): 30 of 9,730 = 3.08x. So no
    # page (14.4x over 1 h, or 6x over 6 h), but a ticket (3x over 1 d and 2 h).
    assert row.split() == [
        "gateway-availability", "-", "99.9%", "99.692%", "-208.3%", "5.13x", "3.08x",
        "BURNING", "(ticket)",
    ]  # fmt: skip
    ml = next(line for line in lines if line.startswith("queue-wait"))
    assert ml.split()[:5] == ["queue-wait", "ml", "90%", "<=", "10m00s"]
    # 19 of 20 within 10 minutes: 95%; a budget of 2 waits, 1 spent; 0.05 / 0.1 = 0.5x.
    assert ml.split()[5:] == ["95.000%", "50.0%", "-", "0.50x"]
    alias = next(line for line in lines if line.startswith("registry-alias-latency"))
    assert alias.split()[2:5] == ["99%", "<=", "50.0"] and alias.endswith("no data")
    assert len(lines) < 25  # one screen


def test_status_json_carries_the_slos(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert gateway.run("status", "--http", gateway.http, "-o", "json") == 0
    body = json.loads(capsys.readouterr().out)
    gateway_slo = next(s for s in body["slos"] if s["name"] == "gateway-availability")
    assert (gateway_slo["good"], gateway_slo["total"]) == (9700, 9730)
    assert gateway_slo["burn_rates"]["1h"] == pytest.approx((30 / 5850) / 0.001)
    assert gateway_slo["alerts"] == ["ticket"]
    assert body["slo_error"] == "" and body["slo_source"] == "recorded"


def test_status_says_why_slos_are_missing(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # A gateway whose gRPC port does not answer: the health part still shows.
    code = cli.main(["--gateway", "127.0.0.1:1", "status", "--http", gateway.http])
    out = capsys.readouterr().out
    assert code == 0 and "Plinth is SERVING" in out
    assert "SLOs: not available:" in out and "127.0.0.1:1" in out


def test_report_is_the_weekly_review(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert gateway.run("report") == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["ml", "95.0%", "19", "1", "0"] in lines
    assert ["cv", "-", "0", "0", "3"] in lines
    # p50 is the 60 s bound; p90: 18th of 20, in (60, 300]: 60 + 240 * 8/10.
    assert ["ml", "1m00s", "4m12s"] in lines
    assert ["fraud", "25.0", "ms"] in lines  # 99% within 25 ms exactly
    assert ["GetModelVersionByAlias", "1500"] in lines and ["total", "1520"] in lines
    assert gateway.platform.requests[-1].since == "7d"
    assert len(lines) < 25


def test_report_json_and_options(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert gateway.run("report", "--since", "2d", "--team", "ml", "-o", "json") == 0
    body = json.loads(capsys.readouterr().out)
    assert body["team"] == "ml"
    assert body["jobs"] == {
        "ml": {"succeeded": 19, "failed": 1, "cancelled": 0, "success_rate": 0.95}
    }
    assert body["queue_waits"]["ml"]["p90_seconds"] == pytest.approx(252.0)
    assert body["endpoint_p99"] == {"fraud": pytest.approx(0.025)}
    (request,) = gateway.platform.requests
    assert (request.since, request.team) == ("2d", "ml")


def test_report_errors_are_one_readable_line(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("report", "--since", "a-week") == 1
    err = capsys.readouterr().err
    assert "since" in err and "7d" in err and "Traceback" not in err
    assert gateway.run("report", "--team", "secret") == 1
    assert "secret" in capsys.readouterr().err
    with Plinth(gateway.address) as client, pytest.raises(NotFound):
        client.platform.report(team="secret")
