"""``plinth audit list``: the audit trail, newest first (admin)."""

from __future__ import annotations

import sys
from datetime import datetime
from itertools import islice

import click

from plinth_sdk.cli.base import NON_NEGATIVE, leaf
from plinth_sdk.cli.events import SINCE
from plinth_sdk.cli.output import print_json, print_table, time_text
from plinth_sdk.client import Plinth
from plinth_sdk.models import AuditRecord

__all__ = ["audit"]

_COLUMNS = ("TIME", "WHO", "PERMISSION", "TEAM", "RESOURCE", "OUTCOME", "MESSAGE")
_DEFAULT_LIMIT = 100


@click.group(help="The audit trail: every mutating call and every denial (admin).")
def audit() -> None:
    """The ``audit`` group."""


@leaf(audit, "list", help="List audit records, newest first.")
@click.option("--team", help="only calls about this team")
@click.option("--user", help="only calls by this user or service account")
@click.option("--since", type=SINCE, default=None, help="only since then: 10m, 2h, 1d or ISO 8601")
@click.option("--until", type=SINCE, default=None, help="only before then: 10m, 2h, 1d or ISO 8601")
@click.option("--denied", is_flag=True, help="only the calls that were refused")
@click.option(
    "--limit",
    type=NON_NEGATIVE,
    default=_DEFAULT_LIMIT,
    help=f"at most N records (default: {_DEFAULT_LIMIT}; 0: all)",
)
def list_records(
    client: Plinth,
    *,
    team: str | None,
    user: str | None,
    since: datetime | None,
    until: datetime | None,
    denied: bool,
    limit: int,
    output: str,
) -> int:
    """Lists audit records."""
    found = client.audit.iter(
        team=team,
        user=user,
        since=since,
        until=until,
        denied_only=denied,
        page_size=min(limit, 500) if limit else 500,
    )
    listed = list(islice(found, limit) if limit else found)
    if output == "json":
        print_json([record.to_dict() for record in listed])
    elif not listed:
        print("No audit records found.", file=sys.stderr)
    else:
        print_table(_COLUMNS, [_row(record) for record in listed])
    return 0


def _row(record: AuditRecord) -> list[str]:
    return [
        time_text(record.time) or "-",
        record.principal or "(unauthenticated)",
        record.permission or record.method,
        record.team or "-",
        record.resource or "-",
        record.outcome,
        record.message or "-",
    ]
