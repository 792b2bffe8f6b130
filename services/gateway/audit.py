"""The audit log's writer: records go to a bounded queue and are stored in batches, off the
request path, each with its ``plinth.audit.recorded`` event (the outbox, same transaction).

A flood of denied calls must not grow memory without bound: the queue holds at most
``max_pending`` records; past that, records are dropped and counted (:attr:`AuditLog.dropped`)
and a warning says how many, at most once per ``warn_every_s``. Authenticated callers are rate
limited before anything is recorded, so only unauthenticated floods can reach the bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Protocol

from services.gateway.identity import AuditEntry

__all__ = ["AuditLog", "AuditSink"]

log = logging.getLogger(__name__)


class AuditSink(Protocol):
    """Stores audit entries (and their events)."""

    async def add_audit(self, entries: Sequence[AuditEntry]) -> None: ...


class AuditLog:
    """Queues audit entries and stores them in the background.

    Args:
        sink: where entries are stored.
        max_pending: entries queued at most; more are dropped and counted.
        batch_size: entries stored per transaction.
        warn_every_s: the least time between two "dropped" warnings.
    """

    def __init__(
        self,
        sink: AuditSink,
        *,
        max_pending: int = 10_000,
        batch_size: int = 256,
        warn_every_s: float = 10.0,
    ) -> None:
        self._sink = sink
        self._queue: asyncio.Queue[AuditEntry] = asyncio.Queue(maxsize=max_pending)
        self._batch_size = batch_size
        self._warn_every_s = warn_every_s
        self._warned_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.stored = 0

    @property
    def pending(self) -> int:
        """Entries waiting to be stored."""
        return self._queue.qsize()

    def record(self, entry: AuditEntry) -> None:
        """Queues an entry; never waits (a full queue drops it and counts it)."""
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1
            now = time.monotonic()
            if now - self._warned_at >= self._warn_every_s:
                self._warned_at = now
                log.warning(
                    "audit queue full: %d records dropped so far (a flood of calls?)",
                    self.dropped,
                )

    async def start(self) -> None:
        """Starts storing in the background."""
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Stores what is queued (within a few seconds), then stops."""
        if self._task is None:
            return
        with suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=5.0)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def flush(self) -> None:
        """Stores every queued entry now."""
        while not self._queue.empty():
            await self._store(self._take_batch())

    def _take_batch(self) -> list[AuditEntry]:
        batch: list[AuditEntry] = []
        while len(batch) < self._batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _store(self, batch: list[AuditEntry]) -> None:
        if not batch:
            return
        try:
            await self._sink.add_audit(batch)
            self.stored += len(batch)
        except Exception:  # a database outage must not end the writer; the batch is lost
            log.exception("cannot store %d audit records", len(batch))

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first, *self._take_batch()]
            await self._store(batch)
