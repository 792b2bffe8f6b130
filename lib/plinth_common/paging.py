"""The one paging vocabulary of Plinth's List RPCs.

``page_size`` 0 means the default; a token is opaque to clients. Stores page by a monotonically
increasing sequence number ("rows older than ``seq``"), fetching one row more than the page to
know whether another page follows::

    page = PageRequest.parse(page_size, page_token, kind="jobs")
    rows = await store.page(session, limit=page.fetch_limit, before_seq=page.before)
    items, token = page.cut(rows, seq=lambda row: row.seq)

Pure functions: no I/O, no grpc.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from plinth_common.errors import InvalidArgument

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "PageRequest",
    "check_page_size",
    "decode_token",
    "encode_token",
]

T = TypeVar("T")

#: What a List RPC returns when the caller leaves ``page_size`` at 0.
DEFAULT_PAGE_SIZE = 50
#: The most any List RPC returns in one page, unless the engine behind it allows less.
MAX_PAGE_SIZE = 500


def check_page_size(
    value: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    """The page size to use: 0 means ``default``; negative or above ``maximum`` is refused."""
    if not 0 <= value <= maximum:
        raise InvalidArgument("page_size", f"between 0 and {maximum}, got {value}")
    return value or default


def encode_token(kind: str, seq: int) -> str:
    """An opaque token for "``kind`` older than ``seq``"."""
    return base64.urlsafe_b64encode(f"{kind}:{seq}".encode()).decode()


def decode_token(token: str, kind: str) -> int:
    """Reverses :func:`encode_token`; a token of another kind, or none of ours, is refused."""
    try:
        found, seq = base64.urlsafe_b64decode(token.encode("ascii")).decode().split(":")
        if found != kind:
            raise ValueError(found)
        return int(seq)
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidArgument("page_token", "not a token this server issued") from None


@dataclass(frozen=True)
class PageRequest:
    """A checked ``page_size`` and ``page_token`` for keyset paging by sequence number.

    Attributes:
        kind: what is paged (``jobs``, ``deployments``); tokens of one kind fit no other.
        limit: rows in one page.
        before: only rows with a smaller sequence number (None on the first page).
    """

    kind: str
    limit: int
    before: int | None

    @classmethod
    def parse(
        cls,
        page_size: int,
        page_token: str,
        *,
        kind: str,
        default: int = DEFAULT_PAGE_SIZE,
        maximum: int = MAX_PAGE_SIZE,
    ) -> PageRequest:
        """Checks the request's paging fields (raising InvalidArgument naming the field)."""
        limit = check_page_size(page_size, default=default, maximum=maximum)
        before = decode_token(page_token, kind) if page_token else None
        return cls(kind=kind, limit=limit, before=before)

    @property
    def fetch_limit(self) -> int:
        """How many rows to fetch: one more than a page, to learn whether another follows."""
        return self.limit + 1

    def cut(self, rows: Sequence[T], *, seq: Callable[[T], int]) -> tuple[list[T], str]:
        """The page of ``rows`` (fetched with :attr:`fetch_limit`) and the next page's token."""
        page = list(rows[: self.limit])
        token = encode_token(self.kind, seq(page[-1])) if len(rows) > self.limit else ""
        return page, token
