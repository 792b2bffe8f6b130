"""The one ``next_page_token`` loop of the SDK, and its page-size check.

Example:
    >>> def fetch(token: str) -> tuple[list[int], str]:
    ...     return ([1, 2], "next") if not token else ([3], "")
    >>> list(paged(fetch))
    [1, 2, 3]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from plinth_common.paging import MAX_PAGE_SIZE

__all__ = ["MAX_PAGE_SIZE", "PageFetch", "check_page_size", "paged"]

_T = TypeVar("_T")

#: Fetches the page a token names ("" for the first) and returns its items and the next token
#: ("" after the last page).
PageFetch = Callable[[str], tuple[Iterable[_T], str]]


def paged(fetch: PageFetch[_T]) -> Iterator[_T]:
    """Yields every item of every page, fetching the next page only when it is reached."""
    token = ""
    while True:
        items, token = fetch(token)
        yield from items
        if not token:
            return


def check_page_size(page_size: int, *, maximum: int = MAX_PAGE_SIZE) -> int:
    """Returns ``page_size`` if it is between 1 and ``maximum``.

    Raises:
        ValueError: it is not; checked here so the mistake is not a round trip away.
    """
    if not 1 <= page_size <= maximum:
        raise ValueError(f"page_size must be between 1 and {maximum}, got {page_size}")
    return page_size
