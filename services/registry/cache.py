"""A small read cache for the registry's hot reads (a version by alias, model searches).

Entries live ``ttl_s`` seconds in a :class:`cachetools.TTLCache` (least recently used ones go
first when it is full). The registry's own writes call :meth:`ReadCache.invalidate`, so a
reader never sees data older than the registry's last write; writes made behind its back
(MLflow's UI, another client on the same store) show after at most ``ttl_s``. Concurrent
misses on one key share one load (cachetools' own stampede guard is for threads, not for
coroutines), and a load that raced with a write is not stored.

Used from the event loop only (no locking).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from cachetools import TTLCache

T = TypeVar("T")
_MISSING = object()


class ReadCache:
    """TTL + LRU cache with write invalidation and single-flight loads.

    Args:
        ttl_s: how long an entry is served; 0 disables caching (every read loads).
        max_entries: least recently used entries go beyond this.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._entries: TTLCache[Hashable, Any] = TTLCache(
            maxsize=max_entries, ttl=max(ttl_s, 0.0), timer=clock
        )
        self._loading: dict[Hashable, asyncio.Future[Any]] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """False when the TTL is 0."""
        return self._ttl_s > 0

    async def get(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        """The cached value of ``key``, or what ``load()`` returns (stored unless a write raced)."""
        if not self.enabled:
            return await load()
        value = self._entries.get(key, _MISSING)
        if value is not _MISSING:
            self.hits += 1
            return value  # type: ignore[no-any-return]
        self.misses += 1
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key, load, self._generation))
            # Every waiter may have been cancelled: still retrieve the outcome (no "never retrieved").
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._loading[key] = pending
        # Shielded: one caller giving up must not cancel the load the others wait for.
        return await asyncio.shield(pending)  # type: ignore[no-any-return]

    async def _load(self, key: Hashable, load: Callable[[], Awaitable[T]], generation: int) -> T:
        try:
            value = await load()
        finally:
            if self._loading.get(key) is asyncio.current_task():
                del self._loading[key]
        if generation == self._generation:
            self._entries[key] = value
        return value

    def invalidate(self) -> None:
        """Forgets everything: called after each of the registry's own writes.

        Writes are rare next to reads, so dropping all entries (rather than tracking which
        searches a model appears in) costs little and cannot miss a dependent entry.
        """
        self._generation += 1
        self._entries.clear()
        # Loads started before the write may return old data: new readers must not join them.
        self._loading.clear()
