"""``plinth queue`` (anyone: the queues of their teams) and ``plinth admin queues`` (the
platform admin's configuration of flavors, cluster queues, cohorts, quotas and priorities)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from plinth_sdk.cli.base import leaf
from plinth_sdk.cli.output import (
    estimate_text,
    print_json,
    print_table,
    quantity_text,
    stderr_line,
    stderr_warning,
    time_text,
)
from plinth_sdk.client import Plinth
from plinth_sdk.errors import InvalidArgument
from plinth_sdk.models import ClusterQueueStatus, PendingJob, QueueConfigInfo, QueueStatus

__all__ = ["admin", "queue"]

_QUEUE_COLUMNS = (
    "QUEUE",
    "COHORT",
    "FLAVOR",
    "RESOURCE",
    "USED/NOMINAL",
    "BORROWED",
    "LENT",
    "ADMITTED",
    "PENDING",
    "TEAMS",
)
_PENDING_COLUMNS = (
    "POS",
    "IN COHORT",
    "JOB",
    "NAME",
    "TEAM",
    "QUEUE",
    "PRIORITY",
    "ESTIMATED START",
    "REASON",
)


@leaf(
    None,
    "queue",
    help="Show the queues of your teams: usage against quota, borrowed and lent; and every "
    "pending job's position, reason and estimated start.",
)
@click.option("--team", help="only this team's queue")
def queue(client: Plinth, *, team: str | None, output: str) -> int:
    """Shows the queues."""
    status = client.queues.get(team=team)
    if output == "json":
        print_json(status.to_dict())
        return 0
    print_queue_status(status)
    return 0


def print_queue_status(status: QueueStatus) -> None:
    """Prints the queues' usage table, then the pending jobs in admission order."""
    if not status.queues:
        print("No queues found.", file=sys.stderr)
        return
    print_table(_QUEUE_COLUMNS, [row for q in status.queues for row in _queue_rows(q)])
    if not status.pending:
        print("\nNo pending jobs.")
        return
    print()
    print("PENDING (in admission order)")
    print_table(_PENDING_COLUMNS, [_pending_row(job) for job in status.pending])


def _queue_rows(q: ClusterQueueStatus) -> list[list[str]]:
    teams = ",".join(q.teams) or "-"
    base = [q.name, q.cohort or "-"]
    counts = [str(q.admitted), str(q.pending), teams]
    if not q.usage:
        return [[*base, "-", "-", "-", "-", "-", *counts]]
    return [
        [
            *base,
            usage.flavor,
            usage.resource,
            f"{quantity_text(usage.resource, usage.used)}/"
            f"{quantity_text(usage.resource, usage.nominal)}",
            quantity_text(usage.resource, usage.borrowed) if usage.borrowed else "0",
            quantity_text(usage.resource, usage.lent) if usage.lent else "0",
            *counts,
        ]
        for usage in q.usage
    ]


def _pending_row(job: PendingJob) -> list[str]:
    info = job.info
    # Another team's job in a shared queue is counted, not named.
    return [
        str(info.position_in_queue),
        str(info.position_in_cohort) if info.position_in_cohort else "-",
        job.job_id or "-",
        job.name or "(another team's job)",
        job.team or "-",
        job.queue,
        job.priority,
        estimate_text(info),
        info.reason,
    ]


# -- admin queues --------------------------------------------------------------------------


@click.group(help="Platform administration.")
def admin() -> None:
    """The ``admin`` group."""


@admin.group(
    "queues",
    help="The queue configuration: resource flavors, cluster queues and their quotas, "
    "cohorts, priority classes (admin). One document, applied as a whole.",
)
def admin_queues() -> None:
    """The ``admin queues`` group."""


@leaf(
    admin_queues,
    "apply",
    help="Validate FILE (YAML or JSON) and make it the configuration in force, live. A "
    "refused document changes nothing: every problem is printed, one per line.",
)
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="only validate; change nothing")
def apply(client: Plinth, *, path: Path, dry_run: bool, output: str) -> int:
    """Applies a queue configuration."""
    document = _read_document(path)
    try:
        info = client.queues.apply(document, dry_run=dry_run)
    except InvalidArgument as err:
        return _print_refusal(err, path)
    for warning in info.warnings:
        stderr_warning(warning)
    if output == "json":
        print_json(info.to_dict())
    elif dry_run:
        print(f"{path}: valid; nothing applied (dry run)")
    else:
        print(f"applied {path} as version {info.version}")
    return 0


@leaf(
    admin_queues,
    "show",
    help="Print the configuration in force as a document `apply` takes back (YAML by "
    "default); version 0 is the built-in default.",
    output=False,
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    help="output format (default: yaml)",
)
def show(client: Plinth, *, output: str) -> int:
    """Shows the queue configuration."""
    info = client.queues.config()
    if output == "json":
        print_json(_document_object(info))
        return 0
    print(f"# {_version_line(info)}")
    print(info.document.rstrip("\n"))
    return 0


def _version_line(info: QueueConfigInfo) -> str:
    if info.version == 0:
        return "version 0: the built-in default (nothing applied yet)"
    by = f" by {info.applied_by}" if info.applied_by else ""
    return f"version {info.version}, applied {time_text(info.applied_at)}{by}"


def _document_object(info: QueueConfigInfo) -> Any:
    import yaml  # only here: the other commands never need it

    return yaml.safe_load(info.document) if info.document.strip() else {}


def _read_document(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise click.UsageError(f"cannot read {path}: {_os_reason(err)}") from None
    if not text.strip():
        raise click.UsageError(f"{path} is empty")
    if path.suffix.lower() == ".json":
        # Say where a JSON syntax error is here, before the server's more general message.
        try:
            json.loads(text)
        except ValueError as err:
            raise click.UsageError(f"{path} is not valid JSON: {err}") from None
    return text


def _os_reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


def _print_refusal(err: InvalidArgument, path: Path) -> int:
    violations = err.field_violations
    if not violations:
        stderr_line(f"{path} refused: {err.message}")
        return 1
    count = len(violations)
    stderr_line(
        f"{path} refused ({count} problem{'s' if count != 1 else ''}); "
        "the configuration in force is unchanged:"
    )
    for violation in violations:
        # One problem a line, whole, so that each can be fixed from what it says.
        print(f"  {violation.field}: {violation.description}", file=sys.stderr)
    return 1
