"""``plinth events``: watch."""

from __future__ import annotations

import json

import click

from plinth_sdk.cli.base import leaf
from plinth_sdk.cli.output import print_json_line, time_text
from plinth_sdk.client import Plinth
from plinth_sdk.models import Event

__all__ = ["events"]


@click.group(help="Platform events (from now on).")
def events() -> None:
    """The ``events`` group."""


@leaf(events, "watch", help="Print events as they happen from now on (Ctrl-C stops).")
@click.option(
    "--type",
    "types",
    metavar="T",
    multiple=True,
    help="only this type, e.g. job.finished (repeatable)",
)
@click.option("--team", help="only this team's events")
def watch(client: Plinth, *, types: tuple[str, ...], team: str | None, output: str) -> int:
    """Prints one line (or one JSON object) per event."""
    try:
        for event in client.events.watch(types=types, team=team):
            if output == "json":
                print_json_line(event.to_dict())
            else:
                print(_event_line(event), flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


def _event_line(event: Event) -> str:
    payload = json.dumps(event.data, separators=(",", ":"), sort_keys=True)
    return " ".join(
        [
            time_text(event.time, millis=True) or "-",
            event.type or "-",
            event.subject or "-",
            event.team or "-",
            payload,
        ]
    )
