"""The platform's health, SLOs and weekly review: ``plinth.platform``.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     for slo in plinth.platform.status().slos:
    ...         print(slo.name, slo.scope, slo.compliance, slo.budget_remaining)
    ...     print(plinth.platform.report(since="7d").jobs)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_sdk.transport import Transport

__all__ = [
    "ComponentInfo",
    "PlatformAPI",
    "PlatformReport",
    "PlatformStatus",
    "SloInfo",
]


def _opt(message: Message, name: str) -> float | None:
    return float(getattr(message, name)) if message.HasField(name) else None


def _time(message: Message, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    value: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class ComponentInfo:
    """One component: scraped (up), its supervisor state and restarts."""

    name: str
    up: bool
    error: str
    last_scrape: datetime | None
    state: str
    restarts: int


@dataclass(frozen=True)
class SloInfo:
    """One SLO scope's figures (see ``plinth_common.slo``)."""

    name: str
    component: str
    kind: str
    scope: str
    objective: float
    threshold_seconds: float | None
    window_days: float
    good: int
    total: int
    compliance: float | None
    budget_remaining: float
    burn_rates: dict[str, float | None]
    alerts: tuple[str, ...]
    met: bool


@dataclass(frozen=True)
class PlatformStatus:
    """Components and SLOs; ``source`` says whether figures come from the gateway's own
    scrapes (``recorded``) or Prometheus."""

    time: datetime | None
    source: str
    components: list[ComponentInfo] = field(default_factory=list)
    slos: list[SloInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (times as ISO 8601)."""
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class PlatformReport:
    """The review of a period: per team jobs and queue waits; per deployment p99; registry
    calls per method."""

    since: datetime | None
    until: datetime | None
    team: str
    #: team -> {"succeeded", "failed", "cancelled", "success_rate"}
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: team -> {"p50_seconds", "p90_seconds"}
    queue_waits: dict[str, dict[str, float | None]] = field(default_factory=dict)
    #: deployment -> p99 seconds
    endpoint_p99: dict[str, float | None] = field(default_factory=dict)
    #: method -> calls
    registry_calls: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (times as ISO 8601)."""
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def status_from_proto(message: gateway_pb2.PlatformStatus) -> PlatformStatus:
    """``plinth.gateway.v1.PlatformStatus`` -> :class:`PlatformStatus`."""
    return PlatformStatus(
        time=_time(message, "time"),
        source=message.source,
        components=[
            ComponentInfo(
                name=c.name,
                up=c.up,
                error=c.error,
                last_scrape=_time(c, "last_scrape"),
                state=c.state,
                restarts=c.restarts,
            )
            for c in message.components
        ],
        slos=[
            SloInfo(
                name=s.name,
                component=s.component,
                kind=s.kind,
                scope=s.scope,
                objective=s.objective,
                threshold_seconds=_opt(s, "threshold_seconds"),
                window_days=s.window_days,
                good=s.good,
                total=s.total,
                compliance=_opt(s, "compliance"),
                budget_remaining=s.budget_remaining,
                burn_rates={b.window: _opt(b, "rate") for b in s.burn_rates},
                alerts=tuple(s.alerts),
                met=s.met,
            )
            for s in message.slos
        ],
    )


def report_from_proto(message: gateway_pb2.PlatformReport) -> PlatformReport:
    """``plinth.gateway.v1.PlatformReport`` -> :class:`PlatformReport`."""
    return PlatformReport(
        since=_time(message, "since"),
        until=_time(message, "until"),
        team=message.team,
        jobs={
            j.team: {
                "succeeded": j.succeeded,
                "failed": j.failed,
                "cancelled": j.cancelled,
                "success_rate": _opt(j, "success_rate"),
            }
            for j in message.jobs
        },
        queue_waits={
            w.team: {"p50_seconds": _opt(w, "p50_seconds"), "p90_seconds": _opt(w, "p90_seconds")}
            for w in message.queue_waits
        },
        endpoint_p99={e.deployment: _opt(e, "p99_seconds") for e in message.endpoints},
        registry_calls={r.method: r.calls for r in message.registry_calls},
    )


class PlatformAPI:
    """The platform monitor of the gateway: ``plinth.platform``.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(gateway_pb2_grpc.PlatformServiceStub)

    def status(self) -> PlatformStatus:
        """Components and every SLO's compliance, error budget and burn rates (per-team
        figures: the caller's teams; an admin's: all)."""
        request = gateway_pb2.GetPlatformStatusRequest()
        return status_from_proto(self._transport.unary(self._stub.GetPlatformStatus, request))

    def report(self, *, since: str = "7d", team: str | None = None) -> PlatformReport:
        """The review of the last ``since`` (``7d``, ``12h``, ``30m``).

        Raises:
            InvalidArgument: ``since`` is not such a duration (or longer than 90 days).
            NotFound: ``team`` is not one of the caller's teams.
        """
        request = gateway_pb2.GetReportRequest(since=since, team=team or "")
        return report_from_proto(self._transport.unary(self._stub.GetReport, request))
