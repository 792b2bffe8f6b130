"""Service level objectives and error budgets, computed from recorded good/total counts.

Pure: no clock, no store. An SLO says which fraction of events must be good over a window (28
days by default): an availability SLO counts requests that did not fail for a server reason, a
latency SLO counts events at most ``threshold_s`` long (``p99 < 50 ms`` is "99% of calls take at
most 50 ms"). A source hands over :class:`EventCounts` (good and total per time bucket) for each
scope of the SLO (one per team for a per-team SLO, ``""`` otherwise); :func:`evaluate` turns one
series into compliance, the remaining error budget and burn rates, and says which
multi-window burn-rate alerts fire (the Google SRE workbook's policy, the same one the
Prometheus rules in ``deploy/prometheus`` implement).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from plinth_common.errors import InvalidArgument

SliKind = Literal["availability", "latency"]

DEFAULT_WINDOW = timedelta(days=28)


@dataclass(frozen=True, kw_only=True)
class BurnRateAlert:
    """A multi-window burn-rate condition: both windows burn faster than ``factor``.

    Attributes:
        severity: ``page`` (wake someone) or ``ticket``.
        long: the window that says the budget is really going (1 h).
        short: the window that says it is still going now (5 min), so the alert clears soon
            after the problem does.
        factor: the burn rate (multiples of the even spend over the SLO window).
    """

    severity: Literal["page", "ticket"]
    long: timedelta
    short: timedelta
    factor: float


#: The SRE workbook's recommended policy: 2% of the budget in 1 h or 5% in 6 h pages, 10% in
#: 1 d or in 3 d opens a ticket.
BURN_RATE_ALERTS: tuple[BurnRateAlert, ...] = (
    BurnRateAlert(
        severity="page", long=timedelta(hours=1), short=timedelta(minutes=5), factor=14.4
    ),
    BurnRateAlert(
        severity="page", long=timedelta(hours=6), short=timedelta(minutes=30), factor=6.0
    ),
    BurnRateAlert(severity="ticket", long=timedelta(days=1), short=timedelta(hours=2), factor=3.0),
    BurnRateAlert(severity="ticket", long=timedelta(days=3), short=timedelta(hours=6), factor=1.0),
)

#: Burn-rate windows reported for every SLO (and recorded by the Prometheus rules).
BURN_WINDOWS: dict[str, timedelta] = {
    "5m": timedelta(minutes=5),
    "30m": timedelta(minutes=30),
    "1h": timedelta(hours=1),
    "2h": timedelta(hours=2),
    "6h": timedelta(hours=6),
    "1d": timedelta(days=1),
    "3d": timedelta(days=3),
}


@dataclass(frozen=True, kw_only=True)
class Target:
    """What one scope of an SLO must meet (a deployment may set its own).

    Attributes:
        objective: the fraction of good events, e.g. 0.999.
        threshold_s: for a latency SLO, the longest a good event takes.
    """

    objective: float
    threshold_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class Slo:
    """One service level objective of one component.

    Attributes:
        name: its id, e.g. ``gateway-availability``.
        component: the component it belongs to (gateway, registry, scheduler, serving).
        kind: availability or latency.
        description: what it promises, in a sentence.
        target: the default objective (and threshold).
        per: the label it holds for each value of separately (``team``, ``deployment``), or
            ``""`` for one figure.
        window: the compliance and budget window.
        overrides: targets of particular scopes (a deployment's own p99 target).
    """

    name: str
    component: str
    kind: SliKind
    description: str
    target: Target
    per: str = ""
    window: timedelta = DEFAULT_WINDOW
    overrides: Mapping[str, Target] = field(default_factory=dict)

    def target_for(self, scope: str) -> Target:
        """The target of ``scope`` (its override, else the default)."""
        return self.overrides.get(scope, self.target)


#: The defaults of issue 11; :func:`configure` changes them from the platform's configuration.
DEFAULT_SLOS: tuple[Slo, ...] = (
    Slo(
        name="gateway-availability",
        component="gateway",
        kind="availability",
        description="99.9% of API calls through the gateway do not fail for a server reason.",
        target=Target(objective=0.999),
    ),
    Slo(
        name="registry-alias-latency",
        component="registry",
        kind="latency",
        description="99% of GetModelVersionByAlias calls answer within 50 ms (p99 < 50 ms).",
        target=Target(objective=0.99, threshold_s=0.05),
    ),
    Slo(
        name="queue-wait",
        component="scheduler",
        kind="latency",
        description="90% of each team's jobs wait at most 10 minutes for admission (p90).",
        target=Target(objective=0.90, threshold_s=600.0),
        per="team",
    ),
    Slo(
        name="job-start-success",
        component="scheduler",
        kind="availability",
        description="99% of job starts succeed (the platform's part; the user's exit code aside).",
        target=Target(objective=0.99),
    ),
    Slo(
        name="inference-availability",
        component="serving",
        kind="availability",
        description="99.9% of each deployment's inference requests do not fail for a server reason.",
        target=Target(objective=0.999),
        per="deployment",
    ),
    Slo(
        name="inference-latency",
        component="serving",
        kind="latency",
        description="99% of each deployment's inference requests answer within its target (100 ms).",
        target=Target(objective=0.99, threshold_s=0.1),
        per="deployment",
    ),
)


def _target(where: str, raw: Mapping[str, Any], base: Target, kind: SliKind) -> Target:
    unknown = set(raw) - {"objective", "threshold_s", "overrides", "window_days"}
    if unknown:
        raise InvalidArgument(where, f"unknown setting(s): {', '.join(sorted(unknown))}")
    objective = float(raw.get("objective", base.objective))
    if not 0 < objective < 1:
        raise InvalidArgument(f"{where}.objective", f"must be between 0 and 1, got {objective}")
    threshold = raw.get("threshold_s", base.threshold_s)
    if kind == "latency":
        if threshold is None or float(threshold) <= 0:
            raise InvalidArgument(
                f"{where}.threshold_s", "a latency SLO needs a positive threshold"
            )
        threshold = float(threshold)
    elif threshold is not None:
        raise InvalidArgument(f"{where}.threshold_s", "only latency SLOs have a threshold")
    return Target(objective=objective, threshold_s=threshold)


def configure(
    settings: Mapping[str, Mapping[str, Any]], slos: Sequence[Slo] = DEFAULT_SLOS
) -> tuple[Slo, ...]:
    """``slos`` with the platform configuration's changes, e.g.::

        {"inference-latency": {"threshold_s": 0.2,
                               "overrides": {"fraud": {"objective": 0.995, "threshold_s": 0.05}}},
         "gateway-availability": {"objective": 0.9995, "window_days": 30}}

    Raises:
        InvalidArgument: an unknown SLO or setting, or a value out of range.
    """
    by_name = {slo.name: slo for slo in slos}
    unknown = set(settings) - set(by_name)
    if unknown:
        raise InvalidArgument("slos", f"unknown SLO(s): {', '.join(sorted(unknown))}")
    result: list[Slo] = []
    for slo in slos:
        raw = settings.get(slo.name)
        if raw is None:
            result.append(slo)
            continue
        target = _target(slo.name, raw, slo.target, slo.kind)
        overrides = dict(slo.overrides)
        raw_overrides = raw.get("overrides", {})
        if raw_overrides and not slo.per:
            raise InvalidArgument(f"{slo.name}.overrides", "this SLO has one figure, no scopes")
        for scope, scoped in raw_overrides.items():
            overrides[scope] = _target(f"{slo.name}.overrides.{scope}", scoped, target, slo.kind)
        days = float(raw.get("window_days", slo.window / timedelta(days=1)))
        if days <= 0:
            raise InvalidArgument(f"{slo.name}.window_days", "must be positive")
        result.append(replace(slo, target=target, overrides=overrides, window=timedelta(days=days)))
    return tuple(result)


@dataclass(frozen=True)
class EventCounts:
    """Good and total events recorded in one time bucket.

    Attributes:
        start: the bucket's start (the source's resolution: 1 or 5 minutes).
        good: events that met the SLO.
        total: all events.
    """

    start: datetime
    good: int
    total: int

    def __post_init__(self) -> None:
        if not 0 <= self.good <= self.total:
            raise ValueError(f"need 0 <= good <= total, got {self.good}/{self.total}")


class EventCountSource(Protocol):
    """Where recorded counts come from (the platform's own store, or Prometheus)."""

    async def event_counts(
        self, slo: Slo, start: datetime, end: datetime
    ) -> Mapping[str, Sequence[EventCounts]]:
        """The buckets starting in ``[start, end)``, per scope (``""`` for an unscoped SLO)."""
        ...


@dataclass(frozen=True, kw_only=True)
class SloStatus:
    """An SLO's figures for one scope at one moment.

    Attributes:
        slo: the SLO.
        scope: the team or deployment (``""`` for an unscoped SLO).
        target: the scope's target.
        good: good events over the window.
        total: all events over the window.
        compliance: ``good / total`` (None without events).
        budget_remaining: the fraction of the error budget left: 1 untouched, 0 spent,
            negative overspent.
        burn_rates: per window of :data:`BURN_WINDOWS`, how many times faster than even the
            budget burns (1 spends exactly the budget over the SLO window; None without events).
        alerts: severities of the :data:`BURN_RATE_ALERTS` that fire.
    """

    slo: Slo
    scope: str
    target: Target
    good: int
    total: int
    compliance: float | None
    budget_remaining: float
    burn_rates: dict[str, float | None]
    alerts: tuple[str, ...]

    @property
    def met(self) -> bool:
        """Whether the objective holds over the window (True without events)."""
        return self.compliance is None or self.compliance >= self.target.objective


def _sums(series: Sequence[EventCounts], start: datetime, end: datetime) -> tuple[int, int]:
    good = total = 0
    for bucket in series:
        if start <= bucket.start < end:
            good += bucket.good
            total += bucket.total
    return good, total


def burn_rate(
    series: Sequence[EventCounts], objective: float, window: timedelta, now: datetime
) -> float | None:
    """The error ratio of the buckets starting within ``window`` before ``now``, divided by the
    budgeted ratio ``1 - objective``; None without events."""
    good, total = _sums(series, now - window, now)
    if total == 0:
        return None
    return ((total - good) / total) / (1 - objective)


def evaluate(slo: Slo, series: Sequence[EventCounts], now: datetime, scope: str = "") -> SloStatus:
    """Compliance, remaining budget, burn rates and firing alerts of one scope at ``now``."""
    target = slo.target_for(scope)
    good, total = _sums(series, now - slo.window, now)
    budget = (1 - target.objective) * total
    bad = total - good
    rates = {
        name: burn_rate(series, target.objective, window, now)
        for name, window in BURN_WINDOWS.items()
    }
    firing: list[str] = []
    for alert in BURN_RATE_ALERTS:
        long = burn_rate(series, target.objective, alert.long, now)
        short = burn_rate(series, target.objective, alert.short, now)
        if (
            long is not None
            and short is not None
            and long > alert.factor
            and short > alert.factor
            and alert.severity not in firing
        ):
            firing.append(alert.severity)
    return SloStatus(
        slo=slo,
        scope=scope,
        target=target,
        good=good,
        total=total,
        compliance=good / total if total else None,
        budget_remaining=1 - bad / budget if total else 1.0,
        burn_rates=rates,
        alerts=tuple(firing),
    )


async def evaluate_all(
    slos: Sequence[Slo], source: EventCountSource, now: datetime
) -> list[SloStatus]:
    """Every scope of every SLO, over the longest window any of them needs."""
    statuses: list[SloStatus] = []
    longest_alert = max(a.long for a in BURN_RATE_ALERTS)
    for slo in slos:
        start = now - max(slo.window, longest_alert, *BURN_WINDOWS.values())
        per_scope = await source.event_counts(slo, start, now)
        for scope in sorted(per_scope):
            statuses.append(evaluate(slo, per_scope[scope], now, scope))
    return statuses


class RecordedCounts:
    """An in-memory :class:`EventCountSource` that records events into fixed-width buckets (what
    a store-backed recorder keeps in a table).

    Args:
        resolution: bucket width.
    """

    def __init__(self, resolution: timedelta = timedelta(minutes=1)) -> None:
        self._resolution = resolution
        self._buckets: dict[tuple[str, str, datetime], list[int]] = {}

    def record(self, slo: str, when: datetime, *, good: bool, scope: str = "", n: int = 1) -> None:
        """Counts ``n`` events of ``slo`` (and ``scope``) at ``when``."""
        epoch = datetime(1970, 1, 1, tzinfo=when.tzinfo)
        start = epoch + ((when - epoch) // self._resolution) * self._resolution
        counts = self._buckets.setdefault((slo, scope, start), [0, 0])
        counts[0] += n if good else 0
        counts[1] += n

    async def event_counts(
        self, slo: Slo, start: datetime, end: datetime
    ) -> Mapping[str, Sequence[EventCounts]]:
        """The recorded buckets of ``slo`` starting in ``[start, end)``, per scope."""
        found: dict[str, list[EventCounts]] = {}
        for (name, scope, bucket), (good, total) in sorted(self._buckets.items()):
            if name == slo.name and start <= bucket < end:
                found.setdefault(scope, []).append(EventCounts(bucket, good, total))
        return found


def _percent(ratio: float) -> str:
    return f"{ratio * 100:.4g}%"


def markdown_table(slos: Sequence[Slo] = DEFAULT_SLOS) -> str:
    """The README's table of the default SLOs."""
    rows = [
        "| SLO | Component | Objective | Threshold | Per | Window | Promise |",
        "|---|---|---|---|---|---|---|",
    ]
    for slo in slos:
        threshold = slo.target.threshold_s
        shown = "-" if threshold is None else f"{threshold:g} s"
        rows.append(
            f"| `{slo.name}` | {slo.component} | {_percent(slo.target.objective)} | {shown} |"
            f" {slo.per or '-'} | {slo.window.days} d | {slo.description} |"
        )
    return "\n".join(rows)


def slos_from_file(path: Path) -> tuple[Slo, ...]:
    """The default SLOs with a YAML file's changes (``PLINTH_SLOS_FILE``; see :func:`configure`).

    Raises:
        InvalidArgument: an unreadable file, an unknown SLO or setting, a value out of range.
    """
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument("PLINTH_SLOS_FILE", f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgument("PLINTH_SLOS_FILE", "must be a mapping of SLO name -> settings")
    return configure(raw)
