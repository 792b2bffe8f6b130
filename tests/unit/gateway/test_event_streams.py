"""Which events a watcher gets, and when its watch is live: EventStreams with a fake source."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest

from plinth_common.errors import InvalidArgument
from plinth_common.events import CloudEvent
from services.gateway.service import EventStreams, make_filter


def _event(type_: str, team: str, subject: str = "j-1") -> CloudEvent:
    return CloudEvent(
        id=f"{subject}-{type_}",
        type=type_,
        source="/plinth/scheduler",
        subject=subject,
        time=datetime(2026, 1, 1, tzinfo=UTC),
        data=b"",
        extensions={"team": team},
    )


class FakeSource:
    """Hands out ``events`` to each subscriber; records how many subscriptions are open."""

    def __init__(self, events: list[CloudEvent]) -> None:
        self.events = events
        self.open = 0
        self.opened = 0

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[CloudEvent]]:
        self.open += 1
        self.opened += 1
        try:
            yield self._replay()
        finally:
            self.open -= 1

    async def _replay(self) -> AsyncIterator[CloudEvent]:
        for event in self.events:
            yield event


EVENTS = [
    _event("plinth.job.submitted", "vision"),
    _event("plinth.job.finished", "nlp", "j-2"),
    _event("plinth.job.finished", "vision"),
    _event("plinth.model.promoted", "vision", "fraud"),
]


async def _watched(streams: EventStreams, types: list[str], team: str) -> list[str]:
    async with streams.watch(types, team) as events:
        return [f"{e.subject} {e.type}" async for e in events]


@pytest.mark.parametrize(
    ("types", "team", "expected"),
    [
        (["job.finished"], "vision", ["j-1 plinth.job.finished"]),
        (["plinth.job.finished"], "", ["j-2 plinth.job.finished", "j-1 plinth.job.finished"]),
        ([], "nlp", ["j-2 plinth.job.finished"]),
        (
            ["job.submitted", "model.promoted"],
            "vision",
            ["j-1 plinth.job.submitted", "fraud plinth.model.promoted"],
        ),
    ],
)
async def test_watch_selects_by_type_and_team_in_order(
    types: list[str], team: str, expected: list[str]
) -> None:
    assert await _watched(EventStreams(FakeSource(EVENTS)), types, team) == expected


async def test_unknown_type_is_refused_before_subscribing() -> None:
    source = FakeSource(EVENTS)
    with pytest.raises(InvalidArgument) as caught:
        await _watched(EventStreams(source), ["job.exploded"], "")
    assert caught.value.field == "types" and "job.exploded" in caught.value.problem
    assert "job.finished" in caught.value.problem  # lists the known ones
    assert source.opened == 0


async def test_leaving_the_watch_ends_the_subscription() -> None:
    source = FakeSource(EVENTS)
    async with EventStreams(source).watch([], "") as events:
        assert source.open == 1
        first = await anext(events)
    assert first.type == "plinth.job.submitted" and source.open == 0


def test_filter_normalizes_short_names() -> None:
    assert make_filter(["job.finished", "plinth.job.started"], "ml").types == {
        "plinth.job.finished",
        "plinth.job.started",
    }
