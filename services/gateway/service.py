"""Gateway domain logic: which platform events a watcher asked for. No grpc or nats imports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol

from plinth_common.errors import InvalidArgument
from plinth_common.events.envelope import CATALOG, CloudEvent

TYPE_PREFIX = "plinth."


class EventSource(Protocol):
    """Yields platform events as they are published, from now on."""

    def subscribe(self) -> AsyncIterator[CloudEvent]: ...


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

    async def watch(self, types: Iterable[str], team: str) -> AsyncIterator[CloudEvent]:
        """Events matching the filter, as they happen, until the watcher goes away."""
        event_filter = make_filter(types, team)
        async for event in self._source.subscribe():
            if event_filter.matches(event):
                yield event
