"""``plinth status``: is the platform healthy, and how often did ``make run`` restart what.

Asks the gateway's HTTP ``/healthz`` (each service's gRPC health, plus the local launcher's
supervisor status: state, pid, restart count, last exit), then its ``GetPlatformStatus`` for
every SLO's compliance, error budget and burn rates (with the caller's credential). When the gateway does not answer,
the launcher's status file under the data folder still tells which services run. Exit code 0
when every service serves, 1 when the platform is degraded or unreachable.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from plinth_common.config import DEFAULT_GATEWAY_HTTP_PORT, default_data_dir
from plinth_common.devstack import SERVICES, read_supervisor_status
from plinth_sdk.cli.base import OUTPUT
from plinth_sdk.cli.output import print_json, print_table
from plinth_sdk.cli.platform import fetch_status, print_slos
from plinth_sdk.platform import SloInfo

__all__ = ["GATEWAY_HTTP_ENV", "status"]

GATEWAY_HTTP_ENV = "PLINTH_GATEWAY_HTTP"
_DEFAULT_HTTP = f"http://127.0.0.1:{DEFAULT_GATEWAY_HTTP_PORT}"
_TIMEOUT_S = 10.0
_COLUMNS = ("SERVICE", "HEALTH", "STATE", "RESTARTS", "PID", "LAST EXIT")


@click.command(
    name="status",
    help="Each service's health and restarts; exit code 1 when the platform is degraded.",
)
@click.option(
    "--http",
    "http_url",
    metavar="URL",
    default=None,
    help=f"the gateway's HTTP address (default: ${GATEWAY_HTTP_ENV}, else {_DEFAULT_HTTP})",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="the platform's data folder, read when the gateway does not answer "
    "(default: $PLINTH_DATA_DIR, else the checkout's .data)",
)
@click.option("-o", "--output", type=OUTPUT, default="table", help="table (default) or json")
def status(http_url: str | None, data_dir: Path | None, output: str) -> int:
    """Prints the platform's status; returns the exit code."""
    url = (http_url or os.environ.get(GATEWAY_HTTP_ENV) or _DEFAULT_HTTP).rstrip("/")
    folder = data_dir or _data_dir_from_env()
    report = platform_status(url, folder)
    if report["status"] != "UNREACHABLE":
        slos, slo_error = fetch_status()
        report["slos"] = slos.to_dict()["slos"] if slos else []
        report["slo_source"] = slos.source if slos else ""
        report["slo_error"] = slo_error
    if output == "json":
        print_json(report)
    else:
        _print_report(report)
    return 0 if report["status"] == "SERVING" else 1


def platform_status(url: str, data_dir: Path) -> dict[str, Any]:
    """The gateway's health page and the supervisor's status as one record.

    Returns:
        ``{"status": "SERVING"|"DEGRADED"|"UNREACHABLE", "gateway_http": url, "error": str,
        "services": {name: {"health", "state", "restarts", "pid", "last_exit"}}}``.
    """
    health, error = _health_page(url)
    supervisor = health.get("supervisor") if health else None
    if not isinstance(supervisor, Mapping):
        supervisor = read_supervisor_status(data_dir)
    healths = dict(health.get("services", {})) if health else {}
    if health is not None:
        healths.setdefault("gateway", "SERVING")  # it answered the page
    rows = supervisor.get("services", {}) if supervisor else {}
    names = [n for n in SERVICES if n in healths or n in rows]
    names += sorted((set(healths) | set(rows)) - set(names))
    services = {name: _service_row(healths.get(name), rows.get(name)) for name in names}
    overall = "UNREACHABLE" if health is None else str(health.get("status", "DEGRADED"))
    return {"status": overall, "gateway_http": url, "error": error, "services": services}


def _service_row(health: object, row: object) -> dict[str, Any]:
    supervised = row if isinstance(row, Mapping) else {}
    return {
        "health": str(health) if health is not None else "UNKNOWN",
        "state": str(supervised.get("state", "")),
        "restarts": int(supervised.get("restarts", 0) or 0),
        "pid": supervised.get("pid"),
        "last_exit": str(supervised.get("last_exit", "")),
    }


def _health_page(url: str) -> tuple[dict[str, Any] | None, str]:
    """The parsed ``/healthz`` body (it answers 503 with a body when degraded), or None and
    why it could not be read."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=_TIMEOUT_S) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, f"the gateway does not answer at {url} ({reason})"
    try:
        body = json.loads(raw)
    except ValueError:
        return None, f"{url}/healthz did not answer JSON"
    if not isinstance(body, dict):
        return None, f"{url}/healthz did not answer a JSON object"
    return body, ""


def _print_report(report: Mapping[str, Any]) -> None:
    headline = f"Plinth is {report['status']}"
    if report["error"]:
        headline += f": {report['error']}"
    click.echo(headline)
    services: Mapping[str, Mapping[str, Any]] = report["services"]
    if services:
        click.echo("")
        _print_services(services)
    if report.get("slo_error"):
        click.echo(f"\nSLOs: not available: {report['slo_error']}")
    elif report.get("slos"):
        slos = [SloInfo(**{**slo, "alerts": tuple(slo["alerts"])}) for slo in report["slos"]]
        print_slos(slos, report.get("slo_source", ""))


def _print_services(services: Mapping[str, Mapping[str, Any]]) -> None:
    print_table(
        _COLUMNS,
        [
            [
                name,
                row["health"],
                row["state"] or "-",
                str(row["restarts"]),
                str(row["pid"]) if row["pid"] else "-",
                row["last_exit"] or "-",
            ]
            for name, row in services.items()
        ],
    )


def _data_dir_from_env() -> Path:
    configured = os.environ.get("PLINTH_DATA_DIR")
    return Path(configured).expanduser() if configured else default_data_dir()
