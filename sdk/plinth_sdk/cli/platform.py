"""``plinth report`` (the weekly review in one screen) and the SLO part of ``plinth status``,
from the gateway's ``PlatformService``."""

from __future__ import annotations

from collections.abc import Sequence

import click

from plinth_sdk.cli.base import error_line, leaf, leaf_target
from plinth_sdk.cli.output import print_json, print_table, seconds_text
from plinth_sdk.client import Plinth
from plinth_sdk.errors import PlinthClientError
from plinth_sdk.platform import PlatformReport, PlatformStatus, SloInfo

__all__ = ["fetch_status", "print_slos", "report", "slo_rows"]

_SLO_COLUMNS = ("SLO", "SCOPE", "OBJECTIVE", "COMPLIANCE", "BUDGET LEFT", "BURN 1H", "BURN 1D", "")


def _percent(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{round(value * 100, digits) + 0.0:.{digits}f}%"  # + 0.0: never "-0.0%"


def _burn(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _objective(slo: SloInfo) -> str:
    text = f"{slo.objective * 100:g}%"
    if slo.threshold_seconds is not None:
        text += f" <= {_ms(slo.threshold_seconds)}"
    return text


def slo_rows(slos: Sequence[SloInfo]) -> list[list[str]]:
    """The SLO table's rows; the last column says BURNING (alerts) or MISSED."""
    rows: list[list[str]] = []
    for slo in slos:
        verdict = ""
        if slo.alerts:
            verdict = "BURNING (" + ", ".join(slo.alerts) + ")"
        elif not slo.met:
            verdict = "MISSED"
        elif slo.compliance is None:
            verdict = "no data"
        rows.append(
            [
                slo.name,
                slo.scope or "-",
                _objective(slo),
                _percent(slo.compliance),
                "-" if slo.compliance is None else _percent(slo.budget_remaining, 1),
                _burn(slo.burn_rates.get("1h")),
                _burn(slo.burn_rates.get("1d")),
                verdict,
            ]
        )
    return rows


def print_slos(slos: Sequence[SloInfo], source: str) -> None:
    """Prints the SLO table with its heading."""
    click.echo(f"\nSLOs ({'Prometheus' if source == 'prometheus' else 'recorded by the gateway'})")
    print_table(_SLO_COLUMNS, slo_rows(slos))


def fetch_status(timeout_s: float = 10.0) -> tuple[PlatformStatus | None, str]:
    """The gateway's ``GetPlatformStatus`` (with the caller's credential), or None and the
    one-line reason it could not be had."""
    try:
        with Plinth(leaf_target(None), timeout=timeout_s) as client:
            return client.platform.status(), ""
    except PlinthClientError as err:
        return None, error_line(err)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else seconds_text(seconds)


def print_report(found: PlatformReport) -> None:
    """The review as four short tables."""
    period = ""
    if found.since and found.until:
        period = f" {found.since:%Y-%m-%d %H:%M} .. {found.until:%Y-%m-%d %H:%M} UTC"
    click.echo(f"Plinth report{period}" + (f" for team {found.team}" if found.team else ""))
    click.echo("\nJobs")
    if found.jobs:
        print_table(
            ("TEAM", "SUCCESS RATE", "SUCCEEDED", "FAILED", "CANCELLED"),
            [
                [
                    team,
                    _percent(row["success_rate"], 1),
                    str(row["succeeded"]),
                    str(row["failed"]),
                    str(row["cancelled"]),
                ]
                for team, row in found.jobs.items()
            ],
        )
    else:
        click.echo("  no job finished")
    click.echo("\nQueue wait")
    if found.queue_waits:
        print_table(
            ("TEAM", "P50", "P90"),
            [
                [team, _ms(w["p50_seconds"]), _ms(w["p90_seconds"])]
                for team, w in found.queue_waits.items()
            ],
        )
    else:
        click.echo("  no job admitted")
    click.echo("\nEndpoints")
    if found.endpoint_p99:
        print_table(("DEPLOYMENT", "P99"), [[d, _ms(p)] for d, p in found.endpoint_p99.items()])
    else:
        click.echo("  no inference request")
    click.echo("\nRegistry")
    if found.registry_calls:
        total = sum(found.registry_calls.values())
        rows = [[m, str(n)] for m, n in sorted(found.registry_calls.items(), key=lambda r: -r[1])]
        print_table(("METHOD", "CALLS"), [*rows[:8], ["total", str(total)]])
    else:
        click.echo("  no registry call")


@leaf(
    None,
    "report",
    help="The weekly review in one screen: job success rate and queue wait p50/p90 per team, "
    "endpoint p99 per deployment, registry query volume.",
)
@click.option("--since", default="7d", show_default=True, help="the period: 7d, 12h, 30m")
@click.option("--team", default=None, help="only this team (one of yours; admins: any)")
def report(client: Plinth, since: str, team: str | None, output: str) -> int:
    """Prints the report; returns the exit code."""
    found = client.platform.report(since=since, team=team)
    if output == "json":
        print_json(found.to_dict())
    else:
        print_report(found)
    return 0
