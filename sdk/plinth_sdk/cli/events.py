"""``plinth events``: watch (new events, or replayed from a time or a sequence); ``dlq``: the
dead letters, listed, shown and replayed."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

import click

from plinth_sdk.cli.base import NON_NEGATIVE, leaf
from plinth_sdk.cli.output import (
    print_fields,
    print_json,
    print_json_line,
    print_table,
    time_text,
)
from plinth_sdk.client import Plinth
from plinth_sdk.events import DeadLetter
from plinth_sdk.models import Event
from plinth_sdk.paging import MAX_PAGE_SIZE

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


# --------------------------------------------------------------------------- dead letters

_DLQ_COLUMNS = ("SEQ", "DEAD-LETTERED", "TYPE", "SUBJECT", "TEAM", "CONSUMER", "TRIES", "REASON")
_REASON_WIDTH = 80


@events.group(
    "dlq",
    help=(
        "Dead letters: events a consumer gave up on (its handler kept failing or refused "
        "them). List them, show one, replay one once the handler is fixed."
    ),
)
def dlq() -> None:
    """The ``events dlq`` group."""


@leaf(dlq, "list", help="List dead letters, oldest first: what failed, why, how many tries.")
@click.option("--consumer", metavar="NAME", help="only those this consumer gave up on")
@click.option("--type", "type_", metavar="T", help="only this event type, e.g. job.finished")
@click.option("--team", help="only this team's events")
@click.option("--limit", type=NON_NEGATIVE, default=50, help="at most N, 0 for all (default: 50)")
def list_dead_letters(
    client: Plinth,
    *,
    consumer: str | None,
    type_: str | None,
    team: str | None,
    limit: int,
    output: str,
) -> int:
    """Lists dead letters."""
    page_size = min(limit, MAX_PAGE_SIZE) if limit else MAX_PAGE_SIZE
    found = client.events.dead_letters(
        consumer=consumer, type=type_, team=team, page_size=page_size
    )
    listed = list(islice(found, limit) if limit else found)
    if output == "json":
        print_json([letter.to_dict() for letter in listed])
    elif not listed:
        print("No dead letters.", file=sys.stderr)
    else:
        print_table(_DLQ_COLUMNS, [_dead_letter_row(letter) for letter in listed])
    return 0


@leaf(dlq, "show", help="Show one dead letter (SEQ from `plinth events dlq list`) and its payload.")
@click.argument("sequence", metavar="SEQ", type=NON_NEGATIVE)
def show_dead_letter(client: Plinth, *, sequence: int, output: str) -> int:
    """Shows one dead letter."""
    letter = client.events.dead_letter(sequence)
    if output == "json":
        print_json(letter.to_dict())
    else:
        print_fields(_dead_letter_fields(letter))
    return 0


@leaf(
    dlq,
    "replay",
    help=(
        "Publish a dead letter's event again to its subject (same event id) and remove it from "
        "the dead letters. Consumers that handled it already do nothing twice."
    ),
)
@click.argument("sequence", metavar="SEQ", type=NON_NEGATIVE)
def replay_dead_letter(client: Plinth, *, sequence: int, output: str) -> int:
    """Replays one dead letter."""
    replayed = client.events.replay(sequence)
    letter = replayed.dead_letter
    if output == "json":
        print_json({**letter.to_dict(), "event_sequence": replayed.event_sequence})
    else:
        print(
            f"replayed dead letter {letter.sequence}: {letter.event_type or letter.subject} "
            f"{letter.event_id or '-'} is event {replayed.event_sequence} again"
        )
        print(
            f"follow it with: plinth events watch --after {replayed.event_sequence - 1}",
            file=sys.stderr,
        )
    return 0


def _dead_letter_row(letter: DeadLetter) -> list[str]:
    reason = letter.reason
    if len(reason) > _REASON_WIDTH:
        reason = reason[: _REASON_WIDTH - 1] + "…"
    return [
        str(letter.sequence),
        time_text(letter.dead_lettered_at) or "-",
        letter.event_type or letter.subject or "-",
        letter.event_subject or "-",
        letter.team or "-",
        letter.consumer or "-",
        str(letter.deliveries),
        reason or "-",
    ]


def _dead_letter_fields(letter: DeadLetter) -> list[tuple[str, str]]:
    payload = (
        json.dumps(letter.data, separators=(",", ":"), sort_keys=True) if letter.data_json else ""
    )
    return [
        ("Sequence", str(letter.sequence)),
        ("Subject", letter.subject),
        ("Event id", letter.event_id),
        ("Type", letter.event_type),
        ("About", letter.event_subject),
        ("Team", letter.team),
        ("Event time", time_text(letter.event_time)),
        ("Consumer", letter.consumer),
        ("Deliveries", str(letter.deliveries)),
        ("Dead-lettered", time_text(letter.dead_lettered_at)),
        ("Reason", letter.reason),
        ("Payload", payload or f"{len(letter.data_bytes)} bytes, not decodable"),
    ]
