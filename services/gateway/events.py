"""The gateway's consumer side: platform events from NATS, for the event stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager

from nats.aio.msg import Msg

from plinth_common.errors import Unavailable
from plinth_common.events import CloudEvent, EventBus
from plinth_common.events.bus import EVENTS_SUBJECTS
from plinth_common.events.envelope import MalformedEvent

log = logging.getLogger(__name__)


class NatsEventSource:
    """A core-NATS subscription on ``plinth.>`` per watcher, with a bounded buffer.

    Args:
        bus: the gateway's NATS connection.
        buffer: events held for a slow watcher before its stream is ended.
    """

    def __init__(self, bus: EventBus, *, buffer: int = 10_000) -> None:
        self._bus = bus
        self._buffer = buffer

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[CloudEvent]]:
        """A subscription to every platform event, live once entered.

        The iterator ends the stream with Unavailable if the watcher falls too far behind.
        """
        await self._bus.connected()
        queue: asyncio.Queue[Msg | None] = asyncio.Queue(maxsize=self._buffer)

        async def keep(msg: Msg) -> None:
            try:
                queue.put_nowait(msg)
            except asyncio.QueueFull:
                queue.get_nowait()
                queue.put_nowait(None)  # marks the overflow

        subscription = await self._bus.nc.subscribe(EVENTS_SUBJECTS, cb=keep)
        try:
            # The server has the subscription once it answers the flush's PING: from here on
            # nothing published is missed, which is what "live" promises the watcher.
            await self._bus.nc.flush()
            async with aclosing(_drain(queue)) as events:
                yield events
        finally:
            await subscription.unsubscribe()


async def _drain(queue: asyncio.Queue[Msg | None]) -> AsyncGenerator[CloudEvent, None]:
    while True:
        msg = await queue.get()
        if msg is None:
            raise Unavailable("the event stream fell behind and was closed; watch again")
        try:
            yield CloudEvent.from_headers(msg.headers, msg.data)
        except MalformedEvent as exc:
            log.warning("skipping malformed event on %s: %s", msg.subject, exc)
