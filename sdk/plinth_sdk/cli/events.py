"""``plinth events``: watch (new events, or replayed from a time or a sequence)."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from plinth_sdk.cli.base import NON_NEGATIVE, leaf
from plinth_sdk.cli.output import print_json_line, time_text
from plinth_sdk.client import Plinth
from plinth_sdk.models import Event

__all__ = ["events", "parse_since"]

_DURATION = re.compile(r"(?P<amount>\d+(?:\.\d+)?)(?P<unit>[smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, *, now: datetime) -> datetime:
    """``10m``, ``2h``, ``1d``, ``30s`` (that long before ``now``) or an ISO 8601 time (naive:
    UTC) as an aware datetime.

    Raises:
        ValueError: neither form; the message shows both.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is not None:
        seconds = float(match["amount"]) * _UNIT_SECONDS[match["unit"]]
        return now - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected a duration like 10m, 2h, 1d or an ISO 8601 time like "
            f"2025-03-01T12:00:00Z, got {text!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class _SinceType(click.ParamType):
    name = "WHEN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_since(value, now=datetime.now(UTC))
        except ValueError as err:
            self.fail(str(err), param, ctx)


SINCE = _SinceType()


@click.group(help="Platform events: follow new ones, or replay from a time or a sequence first.")
def events() -> None:
    """The ``events`` group."""


@leaf(
    events,
    "watch",
    help=(
        "Print events as they happen (Ctrl-C stops). Only new ones unless --since or --after "
        "replays the past first. Each line starts with the event's sequence: --after SEQ "
        "resumes right after it."
    ),
)
@click.option(
    "--type",
    "types",
    metavar="T",
    multiple=True,
    help="only this type, e.g. job.finished (repeatable)",
)
@click.option("--team", help="only this team's events")
@click.option(
    "--since",
    type=SINCE,
    help="first replay the events since then: 10m, 2h, 1d ago or an ISO 8601 time",
)
@click.option(
    "--after",
    "after",
    type=NON_NEGATIVE,
    metavar="SEQ",
    help="first replay the events after this sequence (resume; 0: all that are kept)",
)
def watch(
    client: Plinth,
    *,
    types: tuple[str, ...],
    team: str | None,
    since: datetime | None,
    after: int | None,
    output: str,
) -> int:
    """Prints one line (or one JSON object) per event."""
    if since is not None and after is not None:
        raise click.UsageError(
            "--since and --after cannot be combined: --after resumes after a sequence, "
            "--since replays from a time"
        )
    last = 0
    try:
        for event in client.events.watch(types=types, team=team, since=since, after_sequence=after):
            last = event.sequence or last
            if output == "json":
                print_json_line(event.to_dict())
            else:
                print(_event_line(event), flush=True)
    except KeyboardInterrupt:
        if last:
            print(f"stopped; resume with: plinth events watch --after {last}", file=sys.stderr)
        return 0
    return 0


def _event_line(event: Event) -> str:
    payload = json.dumps(event.data, separators=(",", ":"), sort_keys=True)
    sequence = event.sequence
    return " ".join(
        ([str(sequence)] if sequence else [])  # 0: a gateway that does not send it
        + [
            time_text(event.time, millis=True) or "-",
            event.type or "-",
            event.subject or "-",
            event.team or "-",
            payload,
        ]
    )
