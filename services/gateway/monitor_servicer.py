"""gRPC servicer of ``plinth.gateway.v1.PlatformService``: the monitor's figures as protobuf.

Any authenticated caller sees the components and the platform-wide SLOs; per-team figures (the
queue-wait SLO's scopes, the report's jobs and waits) show only the caller's teams unless they
are an admin, and a report for one team needs its membership (NOT_FOUND otherwise, as for any
object of another team).
"""

from __future__ import annotations

import grpc

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common.auth import current_principal, require
from plinth_common.auth.permissions import JOBS_READ
from plinth_common.errors import InvalidArgument
from plinth_common.prototime import to_timestamp
from plinth_common.slo import SloStatus
from services.gateway.monitor import (
    ComponentHealth,
    PlatformMonitor,
    PlatformStatus,
    Report,
    parse_since,
)

DEFAULT_SINCE = "7d"


def component_to_proto(component: ComponentHealth) -> gateway_pb2.ComponentStatus:
    """One component's health as protobuf."""
    return gateway_pb2.ComponentStatus(
        name=component.name,
        up=component.up,
        error=component.error,
        last_scrape=to_timestamp(component.last_scrape),
        state=component.state,
        restarts=component.restarts,
        metrics_url=component.metrics_url,
    )


def slo_to_proto(status: SloStatus) -> gateway_pb2.SloStatus:
    """One SLO scope's figures as protobuf."""
    message = gateway_pb2.SloStatus(
        name=status.slo.name,
        component=status.slo.component,
        kind=status.slo.kind,
        scope=status.scope,
        description=status.slo.description,
        objective=status.target.objective,
        window_days=status.slo.window.total_seconds() / 86400,
        good=status.good,
        total=status.total,
        budget_remaining=status.budget_remaining,
        alerts=list(status.alerts),
        met=status.met,
        burn_rates=[
            gateway_pb2.BurnRate(window=window, rate=rate)
            if rate is not None
            else gateway_pb2.BurnRate(window=window)
            for window, rate in status.burn_rates.items()
        ],
    )
    if status.target.threshold_s is not None:
        message.threshold_seconds = status.target.threshold_s
    if status.compliance is not None:
        message.compliance = status.compliance
    return message


def status_to_proto(status: PlatformStatus) -> gateway_pb2.PlatformStatus:
    """The platform status as protobuf."""
    return gateway_pb2.PlatformStatus(
        time=to_timestamp(status.now),
        components=[component_to_proto(c) for c in status.components],
        slos=[slo_to_proto(s) for s in status.slos],
        source=status.source,
    )


def report_to_proto(report: Report) -> gateway_pb2.PlatformReport:
    """The report as protobuf."""
    message = gateway_pb2.PlatformReport(
        since=to_timestamp(report.since), until=to_timestamp(report.until), team=report.team
    )
    for jobs in report.jobs:
        row = message.jobs.add(
            team=jobs.team, succeeded=jobs.succeeded, failed=jobs.failed, cancelled=jobs.cancelled
        )
        if jobs.success_rate is not None:
            row.success_rate = jobs.success_rate
    for team, (p50, p90) in report.queue_wait.items():
        wait = message.queue_waits.add(team=team)
        if p50 is not None:
            wait.p50_seconds = p50
        if p90 is not None:
            wait.p90_seconds = p90
    for deployment, p99 in report.endpoint_p99.items():
        endpoint = message.endpoints.add(deployment=deployment)
        if p99 is not None:
            endpoint.p99_seconds = p99
    for method, calls in report.registry_calls.items():
        message.registry_calls.add(method=method, calls=calls)
    return message


class PlatformServicer(gateway_pb2_grpc.PlatformServiceServicer):
    """``GetPlatformStatus`` and ``GetReport`` from a :class:`PlatformMonitor`."""

    def __init__(self, monitor: PlatformMonitor) -> None:
        self._monitor = monitor

    async def GetPlatformStatus(
        self, request: gateway_pb2.GetPlatformStatusRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PlatformStatus:
        """Components and SLO figures now."""
        principal = current_principal()
        teams = None if principal.admin else list(principal.teams)
        return status_to_proto(await self._monitor.status(teams=teams))

    async def GetReport(
        self, request: gateway_pb2.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PlatformReport:
        """The review of the last ``since`` (7 days by default)."""
        principal = current_principal()
        try:
            since = parse_since(request.since or DEFAULT_SINCE)
        except ValueError as exc:
            raise InvalidArgument("since", str(exc)) from exc
        if request.team:
            require(principal, JOBS_READ, request.team, kind="team", name=request.team)
        teams = None if principal.admin else list(principal.teams)
        return report_to_proto(await self._monitor.report(since, team=request.team, teams=teams))
