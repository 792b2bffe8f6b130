"""A spinner with the elapsed time and what the command waits for, on stderr, while long work
runs (``jobs wait``, ``deployments wait``, ``features materialize``).

Only on a terminal: when stderr is a file or a pipe nothing is drawn, so logs and scripts see
just the result (or the one error line).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["spinner"]


@contextlib.contextmanager
def spinner(description: str, *, console: Console | None = None) -> Iterator[Callable[[str], None]]:
    """Shows ``description`` with a spinner and the elapsed time until the block ends.

    Yields:
        A function that replaces the description (the latest state seen).
    """
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield _ignore
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)
        yield lambda text: progress.update(task, description=text)


def _ignore(text: str) -> None:
    del text
