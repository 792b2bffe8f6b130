"""Gateway domain logic: which platform events a watcher asked for. No grpc or nats imports."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from plinth_common.errors import InvalidArgument
from plinth_common.events.envelope import CATALOG, CloudEvent

TYPE_PREFIX = "plinth."


class EventSource(Protocol):
    """Platform events as they are published."""

    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[CloudEvent]]:
        """A subscription: live once entered (every event published from then on is in the
        iterator), ended on exit."""
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


class EventStreams:
    """Hands each watcher the events its filter selects."""

    def __init__(self, source: EventSource) -> None:
        self._source = source

    @asynccontextmanager
    async def watch(
        self, types: Iterable[str], team: str
    ) -> AsyncIterator[AsyncIterator[CloudEvent]]:
        """A live watch: once entered, the events matching the filter as they happen.

        Raises:
            InvalidArgument: an unknown event type (before subscribing).
        """
        event_filter = make_filter(types, team)
        async with (
            self._source.subscribe() as events,
            aclosing(_matching(events, event_filter)) as matching,
        ):
            yield matching


async def _matching(
    events: AsyncIterator[CloudEvent], event_filter: EventFilter
) -> AsyncGenerator[CloudEvent, None]:
    async for event in events:
        if event_filter.matches(event):
            yield event
