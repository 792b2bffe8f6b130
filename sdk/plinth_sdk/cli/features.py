"""``plinth features``: apply, list, materialize, get."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from plinth_sdk.cli.base import ISO_TIME, MultiValueOption, leaf
from plinth_sdk.cli.output import print_json, print_table, stderr_warning, time_text
from plinth_sdk.cli.progress import spinner
from plinth_sdk.client import Plinth
from plinth_sdk.models import FeatureView, FieldStatus, Materialization, OnlineRow

__all__ = ["features"]

_VIEW_COLUMNS = ("NAME", "ENTITIES", "KEYS", "FEATURES", "TTL", "ONLINE", "SOURCE", "DATA UNTIL")


@click.group(help="Feature store (Feast).")
def features() -> None:
    """The ``features`` group."""


@leaf(features, "apply", help="Apply a feature repository folder (like `feast apply`).")
@click.argument("directory", metavar="DIR")
def apply(client: Plinth, *, directory: str, output: str) -> int:
    """Applies a repository; prints what it defines, and warnings on stderr."""
    try:
        applied = client.features.apply(directory)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    for warning in applied.warnings:
        stderr_warning(warning)
    if output == "json":
        print_json(applied.to_dict())
        return 0
    rows = [
        ["ENTITIES", ", ".join(applied.entities) or "-"],
        ["FEATURE VIEWS", ", ".join(applied.feature_views) or "-"],
        ["ON-DEMAND VIEWS", ", ".join(applied.on_demand_feature_views)],
        ["SERVICES", ", ".join(applied.feature_services)],
        ["DATA SOURCES", ", ".join(applied.data_sources)],
        ["DELETED", ", ".join(applied.deleted)],
    ]
    print_table(None, [row for row in rows if row[1]])
    return 0


@leaf(features, "list", help="List feature views.")
def list_views(client: Plinth, *, output: str) -> int:
    """Lists feature views."""
    views = client.features.list_views()
    if output == "json":
        print_json([view.to_dict() for view in views])
    elif not views:
        print("No feature views found.", file=sys.stderr)
    else:
        print_table(_VIEW_COLUMNS, [_view_row(view) for view in views])
    return 0


@leaf(
    features,
    "materialize",
    help="Load feature values into the online store. Without --start, loads what is new since "
    "the last run (incremental). Times are ISO 8601; without a zone they are UTC.",
)
@click.option("--start", type=ISO_TIME, help="from this time")
@click.option("--end", type=ISO_TIME, help="up to this time (default: now)")
@click.option(
    "--view",
    "views",
    cls=MultiValueOption,
    metavar="V",
    help="only these feature views (default: all)",
)
def materialize(
    client: Plinth,
    *,
    start: datetime | None,
    end: datetime | None,
    views: tuple[str, ...],
    output: str,
) -> int:
    """Materializes, with a spinner while the service works."""
    which = ", ".join(views) or "every feature view"
    if start is not None:
        until = end or datetime.now(UTC)
        if start >= until:
            raise click.UsageError("--start must be before --end")
        text = f"materializing {which} from {time_text(start)} to {time_text(until)}"
        with spinner(text):
            done = client.features.materialize(start, until, views=views)
    else:
        with spinner(f"materializing what is new in {which}"):
            done = client.features.materialize_incremental(end, views=views)
    _print_materialization(done, output)
    return 0


@leaf(
    features,
    "get",
    help="Read online feature values. Each --entity starts one entity row: --entity "
    "driver_id=1001 --entity driver_id=1002 reads two rows. Values are read as JSON where they "
    "are JSON (1001 is an int, 1.5 a float, '\"1001\"' a string), else as plain strings.",
)
@click.option(
    "--feature",
    "feature_refs",
    cls=MultiValueOption,
    required=True,
    metavar="VIEW:FEATURE",
    help="a feature reference (repeatable)",
)
@click.option(
    "--entity",
    "entities",
    cls=MultiValueOption,
    grouped=True,
    required=True,
    metavar="KEY=VALUE",
    help="one entity row (repeatable)",
)
def get(
    client: Plinth,
    *,
    feature_refs: tuple[str, ...],
    entities: tuple[tuple[str, ...], ...],
    output: str,
) -> int:
    """Reads online values."""
    entity_rows = [_parse_entity_row(group) for group in entities]
    try:
        rows = client.features.online(feature_refs, entity_rows)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if output == "json":
        print_json([row.to_dict() for row in rows])
        return 0
    columns: list[str] = []
    for row in rows:
        columns.extend(name for name in row.values if name not in columns)
    print_table(columns, [[_online_cell(row, name) for name in columns] for row in rows])
    return 0


def _print_materialization(done: Materialization, output: str) -> None:
    if output == "json":
        print_json(done.to_dict())
        return
    window = ""
    if done.start_time or done.end_time:
        window = f"{time_text(done.start_time) or '?'} .. {time_text(done.end_time) or '?'}"
    rows = [
        ["FEATURE VIEWS", ", ".join(done.feature_views) or "-"],
        ["WINDOW", window],
        ["DURATION", f"{done.duration_seconds:.2f}s"],
    ]
    print_table(None, [row for row in rows if row[1]])


def _parse_entity_row(pairs: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.UsageError(f"invalid --entity {pair!r}: expected KEY=VALUE")
        row[key] = _typed_value(text)
    return row


def _typed_value(text: str) -> Any:
    """JSON scalars keep their type (1001 -> int, 1.5 -> float, "x" -> str); else a string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, bool | int | float | str) else text


def _view_row(view: FeatureView) -> list[str]:
    return [
        view.name,
        ",".join(view.entities) or "-",
        ",".join(view.join_keys) or "-",
        ",".join(view.features) or "-",
        _ttl_text(view.ttl_seconds),
        "yes" if view.online else "no",
        f"push:{view.push_source}" if view.push_source else (view.batch_source or "-"),
        time_text(view.data_until) or "-",
    ]


def _ttl_text(seconds: float) -> str:
    if not seconds:
        return "-"
    for suffix, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{suffix}"
    return f"{seconds:g}s"


def _online_cell(row: OnlineRow, name: str) -> str:
    status = row.statuses.get(name)
    if status is not None and status not in (FieldStatus.PRESENT, FieldStatus.UNSPECIFIED):
        return f"<{status.value.lower()}>"
    value = row.values.get(name)
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # protobuf numbers are doubles; an INT64 feature reads 12.0
    return json.dumps(value, separators=(",", ":"))
