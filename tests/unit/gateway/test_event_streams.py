"""Which events a watcher gets, from where, and when its watch is live: EventStreams with a fake
source; the request's start point as the servicer reads it; the consumer each start point makes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js.api import DeliverPolicy

from plinth.gateway.v1 import gateway_pb2
from plinth_common.errors import InvalidArgument
from plinth_common.events import CloudEvent
from plinth_common.events.bus import EVENTS_SUBJECTS
from services.gateway.events import _consumer_config
from services.gateway.service import EventStreams, StartPoint, StreamedEvent, make_filter
from services.gateway.servicer import event_to_proto, start_of


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
    """A stream holding ``events`` at sequences 1, 2, ...: hands each subscriber those after its
    start point (a time: those at or after it); records the subscriptions."""

    def __init__(self, events: list[CloudEvent]) -> None:
        self.events = events
        self.open = 0
        self.opened = 0
        self.subscriptions: list[tuple[frozenset[str], StartPoint]] = []

    @asynccontextmanager
    async def subscribe(
        self, *, types: frozenset[str], start: StartPoint
    ) -> AsyncIterator[AsyncIterator[StreamedEvent]]:
        self.open += 1
        self.opened += 1
        self.subscriptions.append((types, start))
        try:
            yield self._replay(start)
        finally:
            self.open -= 1

    async def last_sequence(self) -> int:
        return len(self.events)

    async def _replay(self, start: StartPoint) -> AsyncIterator[StreamedEvent]:
        for sequence, event in enumerate(self.events, start=1):
            if start.after_sequence is not None and sequence <= start.after_sequence:
                continue
            if start.since is not None and event.time < start.since:
                continue
            yield StreamedEvent(event=event, sequence=sequence)


EVENTS = [
    _event("plinth.job.submitted", "vision"),
    _event("plinth.job.finished", "nlp", "j-2"),
    _event("plinth.job.finished", "vision"),
    _event("plinth.model.promoted", "vision", "fraud"),
]


async def _watched(
    streams: EventStreams, types: list[str], team: str, start: StartPoint | None = None
) -> list[str]:
    async with streams.watch(types, team, start=start) as events:
        return [f"{s.event.subject} {s.event.type}" async for s in events]


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
        first = (await anext(events)).event
    assert first.type == "plinth.job.submitted" and source.open == 0


def test_filter_normalizes_short_names() -> None:
    assert make_filter(["job.finished", "plinth.job.started"], "ml").types == {
        "plinth.job.finished",
        "plinth.job.started",
    }


# --------------------------------------------------------------------------- start points


async def test_resume_gives_exactly_the_events_after_the_sequence_and_keeps_the_team_filter() -> (
    None
):
    source = FakeSource(EVENTS)
    streams = EventStreams(source)
    async with streams.watch([], "vision", start=StartPoint(after_sequence=1)) as events:
        replayed = [(s.sequence, s.event.subject) async for s in events]
    # sequence 2 is nlp's: the team filter applies to replayed events too
    assert replayed == [(3, "j-1"), (4, "fraud")]
    assert source.subscriptions == [(frozenset(), StartPoint(after_sequence=1))]


async def test_the_filtered_types_reach_the_source_normalized() -> None:
    source = FakeSource(EVENTS)
    since = datetime(2025, 12, 31, tzinfo=UTC)
    assert await _watched(EventStreams(source), ["job.finished"], "", StartPoint(since=since)) == [
        "j-2 plinth.job.finished",
        "j-1 plinth.job.finished",
    ]
    assert source.subscriptions == [(frozenset({"plinth.job.finished"}), StartPoint(since=since))]


async def test_a_resume_point_past_the_newest_event_is_refused_before_subscribing() -> None:
    source = FakeSource(EVENTS)
    with pytest.raises(InvalidArgument) as caught:
        await _watched(EventStreams(source), [], "", StartPoint(after_sequence=5))
    assert caught.value.field == "after_sequence"
    assert "5 is past the newest event (sequence 4)" in caught.value.problem
    assert source.opened == 0
    # the newest one itself is fine: nothing yet, then what follows
    assert await _watched(EventStreams(source), [], "", StartPoint(after_sequence=4)) == []


def _request(**fields: Any) -> gateway_pb2.WatchEventsRequest:
    return gateway_pb2.WatchEventsRequest(**fields)


def _ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def test_request_start_points() -> None:
    when = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    assert start_of(_request()) == StartPoint()
    assert start_of(_request()).is_live
    assert start_of(_request(since=_ts(when))) == StartPoint(since=when)
    # 0 is a start point of its own (every event kept), not "unset"
    assert start_of(_request(after_sequence=0)) == StartPoint(after_sequence=0)
    assert start_of(_request(after_sequence=41)) == StartPoint(after_sequence=41)


def test_both_start_points_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        start_of(_request(since=_ts(datetime(2026, 3, 1, tzinfo=UTC)), after_sequence=3))
    assert caught.value.field == "after_sequence"
    assert "cannot be combined with since" in caught.value.problem


def test_an_out_of_range_since_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        start_of(_request(since=Timestamp(seconds=10**12)))
    assert caught.value.field == "since" and "between years 1 and 9999" in caught.value.problem


def test_each_event_carries_its_sequence() -> None:
    assert event_to_proto(EVENTS[0], sequence=17).sequence == 17


@pytest.mark.parametrize(
    ("types", "start", "subject", "policy", "filters"),
    [
        (frozenset(), StartPoint(), EVENTS_SUBJECTS, DeliverPolicy.NEW, None),
        (
            frozenset({"plinth.job.finished"}),
            StartPoint(after_sequence=7),
            "plinth.job.finished",
            DeliverPolicy.BY_START_SEQUENCE,
            None,
        ),
        (
            frozenset({"plinth.job.started", "plinth.job.finished"}),
            StartPoint(since=datetime(2026, 1, 1, tzinfo=UTC)),
            EVENTS_SUBJECTS,
            DeliverPolicy.BY_START_TIME,
            ["plinth.job.finished", "plinth.job.started"],
        ),
    ],
)
def test_the_consumer_each_start_point_makes(
    types: frozenset[str],
    start: StartPoint,
    subject: str,
    policy: DeliverPolicy,
    filters: list[str] | None,
) -> None:
    got_subject, config = _consumer_config(types, start)
    assert (got_subject, config.deliver_policy, config.filter_subjects) == (
        subject,
        policy,
        filters,
    )
    if start.after_sequence is not None:
        assert config.opt_start_seq == start.after_sequence + 1  # the first one after it
    if start.since is not None:
        assert config.opt_start_time == start.since


def test_a_future_since_is_a_valid_start_point() -> None:
    later = datetime.now(UTC) + timedelta(days=1)
    assert start_of(_request(since=_ts(later))) == StartPoint(since=later)
