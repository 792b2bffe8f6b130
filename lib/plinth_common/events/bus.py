"""The NATS connection of a service, and the JetStream streams it relies on."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

log = logging.getLogger(__name__)

EVENTS_STREAM = "PLINTH"
EVENTS_SUBJECTS = "plinth.>"
DEAD_LETTER_STREAM = "PLINTH_DLQ"
DEAD_LETTER_PREFIX = "dlq."


@dataclass(frozen=True, kw_only=True)
class StreamSettings:
    """Retention of the event streams.

    Attributes:
        max_age_s: how long events are kept.
        duplicate_window_s: JetStream drops a publish whose Nats-Msg-Id it saw within this window.
    """

    max_age_s: float = 7 * 24 * 3600
    duplicate_window_s: float = 120.0


class EventBus:
    """One NATS connection per process, connected in the background and re-connected forever.

    A service starts and serves while NATS is down; producers keep events in the outbox and
    consumers wait until :meth:`connected` resolves.

    Args:
        url: NATS server URL(s), comma separated.
        name: client name shown by the server.
    """

    def __init__(self, url: str, *, name: str, streams: StreamSettings | None = None) -> None:
        self._servers = [u.strip() for u in url.split(",") if u.strip()]
        self._name = name
        self._streams = streams or StreamSettings()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Starts connecting in the background; returns at once."""
        self._task = asyncio.create_task(self._connect_forever(), name="nats-connect")

    async def _connect_forever(self) -> None:
        # Whatever the failure (no server, no JetStream, a stream refused), keep trying.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential_jitter(initial=0.2, max=5.0, jitter=0.2),
            before_sleep=_log_retry,
            reraise=True,
        )
        await retrying(self._connect_once)

    async def _connect_once(self) -> None:
        try:
            self._nc = await nats.connect(
                servers=self._servers,
                name=self._name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
            self._js = self._nc.jetstream(timeout=5)
            await self.ensure_streams()
        except Exception:
            if self._nc is not None:
                await self._close_quietly()
            raise
        self._ready.set()
        log.info(
            "connected to NATS at %s",
            self._nc.connected_url.netloc if self._nc.connected_url else "?",
        )

    async def ensure_streams(self) -> None:
        """Creates or updates the events stream and the dead-letter stream (idempotent)."""
        js = self.js
        for name, subjects in (
            (EVENTS_STREAM, [EVENTS_SUBJECTS]),
            (DEAD_LETTER_STREAM, [DEAD_LETTER_PREFIX + ">"]),
        ):
            config = StreamConfig(
                name=name,
                subjects=subjects,
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.OLD,
                max_age=self._streams.max_age_s,
                duplicate_window=self._streams.duplicate_window_s,
            )
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await js.update_stream(config)

    async def connected(self) -> JetStreamContext:
        """Waits for the first connection and returns the JetStream context."""
        await self._ready.wait()
        return self.js

    @property
    def is_connected(self) -> bool:
        """True while the connection is up."""
        return self._nc is not None and self._nc.is_connected

    @property
    def nc(self) -> NATS:
        """The core NATS client (after :meth:`connected`)."""
        if self._nc is None:
            raise RuntimeError("NATS is not connected yet")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (after :meth:`connected`)."""
        if self._js is None:
            raise RuntimeError("NATS is not connected yet")
        return self._js

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        log.warning("NATS disconnected")

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected")

    async def _close_quietly(self) -> None:
        # Closing a broken connection may fail in many ways; it is being dropped anyway.
        with suppress(Exception):
            if self._nc is not None and not self._nc.is_closed:
                await self._nc.close()

    async def stop(self) -> None:
        """Stops connecting and drains the connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._nc is not None and self._nc.is_connected:
            try:
                await asyncio.wait_for(self._nc.drain(), timeout=5)
            except Exception:  # noqa: BLE001
                await self._close_quietly()
        else:
            await self._close_quietly()


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("NATS not reachable (%s); retrying in %.1fs", exc, delay)
