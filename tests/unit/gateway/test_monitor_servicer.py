"""Who sees what of ``PlatformService``: per-team figures only of the caller's teams (admins:
all), a report for another team NOT_FOUND, a malformed ``since`` INVALID_ARGUMENT naming it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from plinth.gateway.v1 import gateway_pb2
from plinth_common.auth import Role
from plinth_common.auth.grpc_auth import acting_as
from plinth_common.errors import InvalidArgument, NotFound
from plinth_common.slo import RecordedCounts
from services.gateway.monitor import PlatformMonitor
from services.gateway.monitor_servicer import PlatformServicer
from tests.helpers import ADMIN, member
from tests.unit.sdk.test_platform_cli import MemoryStore

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _servicer() -> PlatformServicer:
    counts = RecordedCounts()
    store = MemoryStore()
    for team in ("ml", "cv"):
        counts.record("queue-wait", NOW - timedelta(minutes=5), good=True, scope=team, n=4)
        store.figures[("jobs_finished", f"{team}|succeeded", NOW - timedelta(hours=1))] = 3.0
    return PlatformServicer(PlatformMonitor([], store, counts=counts, clock=lambda: NOW))


CONTEXT: Any = None


async def test_members_see_their_teams_and_admins_all() -> None:
    servicer = _servicer()
    with acting_as(member("alice", ml=Role.VIEWER)):
        status = await servicer.GetPlatformStatus(gateway_pb2.GetPlatformStatusRequest(), CONTEXT)
        report = await servicer.GetReport(gateway_pb2.GetReportRequest(), CONTEXT)
    assert [s.scope for s in status.slos if s.name == "queue-wait"] == ["ml"]
    assert [j.team for j in report.jobs] == ["ml"]
    with acting_as(ADMIN):
        status = await servicer.GetPlatformStatus(gateway_pb2.GetPlatformStatusRequest(), CONTEXT)
        report = await servicer.GetReport(gateway_pb2.GetReportRequest(team="cv"), CONTEXT)
    assert [s.scope for s in status.slos if s.name == "queue-wait"] == ["cv", "ml"]
    assert [(j.team, j.succeeded) for j in report.jobs] == [("cv", 3)]


async def test_another_teams_report_is_not_found_and_since_is_checked() -> None:
    servicer = _servicer()
    with acting_as(member("alice", ml=Role.VIEWER)):
        with pytest.raises(NotFound):
            await servicer.GetReport(gateway_pb2.GetReportRequest(team="cv"), CONTEXT)
        with pytest.raises(InvalidArgument) as refused:
            await servicer.GetReport(gateway_pb2.GetReportRequest(since="365d"), CONTEXT)
    assert refused.value.field == "since" and "90d" in str(refused.value)
