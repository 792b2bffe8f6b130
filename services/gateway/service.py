"""Gateway domain logic: which platform events a watcher asked for, and from where. No grpc or
nats imports."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from plinth_common.errors import InvalidArgument
from plinth_common.events.envelope import CATALOG, CloudEvent

TYPE_PREFIX = "plinth."


@dataclass(frozen=True, kw_only=True)
class StartPoint:
    """Where a watch begins: new events only (neither set), the events stored from ``since`` on,
    or the events after the stream sequence ``after_sequence``."""

    since: datetime | None = None
    after_sequence: int | None = None

    @property
    def is_live(self) -> bool:
        """True for "new events only"."""
        return self.since is None and self.after_sequence is None


@dataclass(frozen=True, kw_only=True)
class StreamedEvent:
    """An event and its position in the platform's event stream (the resume point)."""

    event: CloudEvent
    sequence: int


class EventSource(Protocol):
    """Platform events from the stream that keeps them."""

    def subscribe(
        self, *, types: frozenset[str], start: StartPoint
    ) -> AbstractAsyncContextManager[AsyncIterator[StreamedEvent]]:
        """A subscription to events of ``types`` (empty: all) from ``start`` on.

        Once entered it is in place: every event published from then on is in the iterator
        (after the replayed ones, with a start point). Ended on exit.
        """
        ...

    async def last_sequence(self) -> int:
        """The sequence of the newest event the stream holds (0: none yet)."""
        ...


@dataclass(frozen=True)
class EventFilter:
    """Event types (empty: all) and a team (empty: all)."""

    types: frozenset[str]
    team: str

    def matches(self, event: CloudEvent) -> bool:
        """Whether a watcher with this filter wants ``event``."""
        return (not self.types or event.type in self.types) and (
            not self.team or event.team == self.team
        )


def make_filter(types: Iterable[str], team: str) -> EventFilter:
    """Normalizes ``job.finished`` to ``plinth.job.finished`` and checks each type exists.

    Raises:
        InvalidArgument: an unknown event type.
    """
    normalized = set()
    for raw in types:
        name = raw if raw.startswith(TYPE_PREFIX) else TYPE_PREFIX + raw
        if name not in CATALOG:
            raise InvalidArgument(
                "types",
                f"unknown event type {raw!r}; known: {', '.join(sorted(t.removeprefix(TYPE_PREFIX) for t in CATALOG))}",
            )
        normalized.add(name)
    return EventFilter(types=frozenset(normalized), team=team)


def make_start(*, since: datetime | None, after_sequence: int | None) -> StartPoint:
    """The start point of a watch; at most one of the two may be given.

    Raises:
        InvalidArgument: both are given, or ``after_sequence`` is negative.
    """
    if since is not None and after_sequence is not None:
        raise InvalidArgument(
            "after_sequence",
            "cannot be combined with since; give one start point (after_sequence to resume, "
            "since to replay from a time)",
        )
    if after_sequence is not None and after_sequence < 0:
        raise InvalidArgument("after_sequence", f"must be 0 or more, not {after_sequence}")
    return StartPoint(since=since, after_sequence=after_sequence)


class EventStreams:
    """Hands each watcher the events its filter selects, from its start point on."""

    def __init__(self, source: EventSource) -> None:
        self._source = source

    @asynccontextmanager
    async def watch(
        self, types: Iterable[str], team: str, *, start: StartPoint | None = None
    ) -> AsyncIterator[AsyncIterator[StreamedEvent]]:
        """A watch: once entered, the matching events from ``start`` on (default: new events
        only), then the ones that happen.

        Raises:
            InvalidArgument: an unknown event type, or a resume point past the newest event
                (both before subscribing).
        """
        event_filter = make_filter(types, team)
        start = start or StartPoint()
        if start.after_sequence is not None:
            await self._check_resume_point(start.after_sequence)
        async with (
            self._source.subscribe(types=event_filter.types, start=start) as events,
            aclosing(_matching(events, event_filter)) as matching,
        ):
            yield matching

    async def _check_resume_point(self, after_sequence: int) -> None:
        # A resume point the stream never reached comes from another stream (a platform whose
        # data was reset) or a typo; following it would silently show nothing for a long time.
        last = await self._source.last_sequence()
        if after_sequence > last:
            raise InvalidArgument(
                "after_sequence",
                f"{after_sequence} is past the newest event (sequence {last}); resume from a "
                "sequence this platform printed, or use since",
            )


async def _matching(
    events: AsyncIterator[StreamedEvent], event_filter: EventFilter
) -> AsyncGenerator[StreamedEvent, None]:
    # The source filters by type already; the team is only in the event's headers.
    async for streamed in events:
        if event_filter.matches(streamed.event):
            yield streamed
