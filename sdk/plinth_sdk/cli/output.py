"""How the CLI prints: Rich tables (plain, aligned columns when stdout is not a terminal, so
``| awk`` keeps working), JSON, and the texts of times, durations and exits.
"""

from __future__ import annotations

import io
import json
import signal
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from plinth_sdk.models import Job, PendingInfo

__all__ = [
    "duration_text",
    "estimate_text",
    "exit_text",
    "memory_text",
    "print_fields",
    "print_json",
    "print_table",
    "quantity_text",
    "seconds_text",
    "time_text",
]

# Wide enough that no row wraps when the output goes to a file or a pipe.
_UNWRAPPED_WIDTH = 1_000_000


def print_table(headers: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> None:
    """Prints aligned columns two spaces apart; ``headers`` None for a key/value listing."""
    table = Table(
        box=None,
        show_header=headers is not None,
        header_style="bold",
        pad_edge=False,
        show_edge=False,
        padding=(0, 1),
    )
    width = len(headers) if headers is not None else len(rows[0]) if rows else 0
    for index in range(width):
        title = headers[index] if headers is not None else ""
        table.add_column(Text(title), style="bold" if headers is None and index == 0 else None)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    terminal = Console(highlight=False)
    if terminal.is_terminal:
        terminal.print(table)
        return
    buffer = io.StringIO()
    Console(file=buffer, width=_UNWRAPPED_WIDTH, color_system=None, highlight=False).print(table)
    for line in buffer.getvalue().splitlines():
        print(line.rstrip())


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    """Prints ``NAME  value`` lines, leaving out unset values rather than showing blanks."""
    print_table(None, [[name, value] for name, value in fields if value])


def print_json(value: Any) -> None:
    """Prints indented JSON."""
    print(json.dumps(value, indent=2))


def print_json_line(value: Any) -> None:
    """Prints compact JSON on one line (for streams of records)."""
    print(json.dumps(value, separators=(",", ":")), flush=True)


def time_text(value: datetime | None, *, millis: bool = False) -> str:
    """``2025-03-01T12:00:00Z``, or "" for None."""
    if value is None:
        return ""
    utc = value.astimezone(UTC)
    return utc.isoformat(timespec="milliseconds" if millis else "seconds").replace("+00:00", "Z")


def seconds_text(seconds: float) -> str:
    """``1h02m03s``, ``2m05s``, ``7s``."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def duration_text(job: Job) -> str:
    """How long a job ran (or has been running), "" before it started."""
    if job.started_at is None:
        return ""
    end = job.finished_at or datetime.now(UTC)
    return seconds_text((end - job.started_at).total_seconds())


def exit_text(job: Job) -> str:
    """``exit 0``, ``signal 9 (SIGKILL)``, or "" for a job that has not ended or never ran."""
    if not job.state.is_terminal:
        return ""
    if job.signal:
        try:
            return f"signal {job.signal} ({signal.Signals(job.signal).name})"
        except ValueError:
            return f"signal {job.signal}"
    # A job cancelled or rejected before it started has no meaningful exit code.
    return f"exit {job.exit_code}" if job.started_at is not None else ""


def memory_text(num_bytes: int) -> str:
    """``2Gi``, ``512Mi``, or the bytes."""
    for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{suffix}"
    return str(num_bytes)


def quantity_text(resource: str, value: float) -> str:
    """A resource amount for people: cores ``2.5``, memory ``1.5Gi`` / ``900Mi``, gpu ``2``."""
    if resource != "memory":
        return f"{value:g}"
    amount = float(value)
    for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if abs(amount) >= size:
            scaled = amount / size
            return f"{scaled:.0f}{suffix}" if scaled >= 100 else f"{scaled:.3g}{suffix}"
    return f"{amount:g}"


def estimate_text(info: PendingInfo, *, now: datetime | None = None) -> str:
    """``in ~4 min (when 2 running jobs end by their declared maximum run time)``, or
    ``unknown: job j-x ahead has no run time limit and no history``."""
    basis = info.estimate_basis
    if info.estimated_start is None:
        if not basis:
            return "unknown"
        return basis if basis.startswith("unknown") else f"unknown: {basis}"
    seconds = (info.estimated_start - (now or datetime.now(UTC))).total_seconds()
    if seconds <= 0:
        when = "any moment now"
    elif seconds < 60:
        when = "in <1 min"
    elif seconds < 3600:
        when = f"in ~{round(seconds / 60)} min"
    elif seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        when = f"in ~{hours} h {minutes:02d} min"
    else:
        when = f"at {time_text(info.estimated_start)}"
    return f"{when} ({basis})" if basis else when


def pairs_text(values: Mapping[str, str]) -> str:
    """``A=1 B='x y'`` (shell-quoted), sorted by key."""
    import shlex

    return " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(values.items()))


def stderr_line(message: str) -> None:
    """Prints one line on stderr, prefixed with the program name."""
    print(f"plinth: {' '.join(message.split())}", file=sys.stderr)


def stderr_warning(message: str) -> None:
    """Prints ``warning: ...`` on stderr, one line."""
    print(f"warning: {' '.join(message.split())}", file=sys.stderr)
