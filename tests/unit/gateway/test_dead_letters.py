"""Dead letters as the gateway lists, shows and replays them, with a fake store: what each one
says, filters and pages, the replay's headers (same ce-id, a new message id that a retried
replay repeats, the consumer's headers gone), removal only after the publish, and the proto
form of a dead letter whose payload does not decode. Also: a live watch is pinned to the newest
sequence, so it has a resume point before its first event."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from plinth.events.v1 import events_pb2
from plinth_common.errors import InvalidArgument, NotFound, Unavailable
from plinth_common.events.envelope import new_event
from plinth_common.paging import encode_token
from services.gateway.service import (
    DEAD_LETTER_PAGES,
    DeadLetterFilter,
    DeadLetters,
    EventStreams,
    StartPoint,
    StoredMessage,
)
from services.gateway.servicer import dead_letter_to_proto
from tests.unit.gateway.test_event_streams import EVENTS, FakeSource

WHEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _letter(sequence: int, *, consumer: str, team: str = "ml", view: str = "v") -> StoredMessage:
    event = new_event(
        events_pb2.FeaturesMaterialized(feature_views=[view]),
        source="/plinth/features",
        subject=view,
        team=team,
    )
    headers = event.headers()
    headers.update(
        {
            "plinth-dlq-reason": "RuntimeError: boom",
            "plinth-dlq-consumer": consumer,
            "plinth-dlq-deliveries": "5",
            "plinth-dlq-subject": event.type,
            "Nats-Msg-Id": f"{event.id}:{consumer}",
        }
    )
    return StoredMessage(
        sequence=sequence,
        subject="dlq." + event.type,
        headers=headers,
        data=event.data,
        stored_at=WHEN,
    )


class FakeStore:
    """Dead letters by sequence (gaps where some were removed); records publishes."""

    prefix = "dlq."

    def __init__(self, messages: list[StoredMessage]) -> None:
        self.messages = {m.sequence: m for m in messages}
        self.published: list[tuple[str, dict[str, str], bytes]] = []
        self.fail_publish = False
        self.reads = 0

    async def next_message(self, after: int, *, subject: str) -> StoredMessage | None:
        self.reads += 1
        for sequence in sorted(self.messages):
            message = self.messages[sequence]
            if sequence > after and (subject == "dlq.>" or message.subject == subject):
                return message
        return None

    async def message(self, sequence: int) -> StoredMessage | None:
        return self.messages.get(sequence)

    async def publish(self, subject: str, headers: Mapping[str, str], data: bytes) -> int:
        if self.fail_publish:
            raise Unavailable("NATS is down", dependency="NATS")
        self.published.append((subject, dict(headers), data))
        return 100 + len(self.published)

    async def remove(self, sequence: int) -> None:
        self.messages.pop(sequence, None)


def _store() -> FakeStore:
    return FakeStore(
        [
            _letter(2, consumer="registry-job-finished"),
            _letter(5, consumer="serving-promoted", team="nlp"),
            _letter(9, consumer="registry-job-finished", view="w"),
        ]
    )


async def test_a_dead_letter_says_what_failed_why_how_often_and_when() -> None:
    letter = await DeadLetters(_store()).get(2)
    assert (letter.subject, letter.event_type, letter.consumer) == (
        "plinth.features.materialized",
        "plinth.features.materialized",
        "registry-job-finished",
    )
    assert (letter.reason, letter.deliveries, letter.dead_lettered_at) == (
        "RuntimeError: boom",
        5,
        WHEN,
    )
    proto = dead_letter_to_proto(letter)
    assert (proto.event_subject, proto.team, proto.data_json) == (
        "v",
        "ml",
        '{"feature_views": ["v"]}',
    )
    assert proto.event_id == letter.event_id and proto.event_time.seconds > 0


async def test_listing_filters_and_pages_oldest_first() -> None:
    letters = DeadLetters(_store())
    everything, token = await letters.list(page_size=0, page_token="", where=DeadLetterFilter())
    assert [d.sequence for d in everything] == [2, 5, 9] and token == ""
    first, token = await letters.list(
        page_size=1, page_token="", where=DeadLetterFilter(consumer="registry-job-finished")
    )
    assert [d.sequence for d in first] == [2] and token
    second, token = await letters.list(
        page_size=1, page_token=token, where=DeadLetterFilter(consumer="registry-job-finished")
    )
    assert [d.sequence for d in second] == [9]
    nlp, _ = await letters.list(page_size=5, page_token="", where=DeadLetterFilter(team="nlp"))
    assert [d.sequence for d in nlp] == [5]
    typed, _ = await letters.list(
        page_size=5, page_token="", where=DeadLetterFilter(type="features.materialized")
    )
    assert [d.sequence for d in typed] == [2, 5, 9]
    other, _ = await letters.list(
        page_size=5, page_token="", where=DeadLetterFilter(type="job.finished")
    )
    assert other == []


async def test_a_filter_that_matches_little_reads_a_bounded_number() -> None:
    store = _store()
    letters = DeadLetters(store, max_scanned=2)
    found, token = await letters.list(
        page_size=5, page_token="", where=DeadLetterFilter(consumer="nobody")
    )
    assert found == [] and token and store.reads == 2  # the next page goes on from there
    found, token = await letters.list(
        page_size=5, page_token=token, where=DeadLetterFilter(consumer="nobody")
    )
    assert found == [] and token == ""


async def test_bad_requests_name_the_field() -> None:
    letters = DeadLetters(_store())
    with pytest.raises(InvalidArgument) as caught:
        await letters.get(0)
    assert caught.value.field == "sequence"
    with pytest.raises(InvalidArgument) as caught:
        await letters.list(page_size=0, page_token="nonsense", where=DeadLetterFilter())
    assert caught.value.field == "page_token"
    with pytest.raises(InvalidArgument) as caught:
        await letters.list(page_size=501, page_token="", where=DeadLetterFilter())
    assert caught.value.field == "page_size"
    with pytest.raises(NotFound, match="replayed already or never existed"):
        await letters.get(3)
    for bad_type in ("job.>", "job.*", "job finished", "job..finished", "x" * 300):
        with pytest.raises(InvalidArgument) as caught:
            await letters.list(page_size=0, page_token="", where=DeadLetterFilter(type=bad_type))
        assert caught.value.field == "type"
    negative = encode_token(DEAD_LETTER_PAGES, -4)
    with pytest.raises(InvalidArgument) as caught:
        await letters.list(page_size=0, page_token=negative, where=DeadLetterFilter())
    assert caught.value.field == "page_token"


async def test_replay_republishes_the_original_event_with_a_new_message_id_then_removes_it() -> (
    None
):
    store = _store()
    original = store.messages[2]
    replayed = await DeadLetters(store).replay(2)
    ((subject, headers, data),) = store.published
    assert subject == "plinth.features.materialized" and data == original.data
    assert headers["ce-id"] == original.headers["ce-id"]  # the handler's idempotency key
    assert headers["Nats-Msg-Id"] == f"{original.headers['ce-id']}:replay:2"
    assert headers["Nats-Msg-Id"] != original.headers["ce-id"]  # not dropped as a duplicate
    assert not [k for k in headers if k.startswith("plinth-dlq-")]
    assert replayed.event_sequence == 101 and 2 not in store.messages
    with pytest.raises(NotFound):
        await DeadLetters(store).replay(2)


async def test_a_replay_whose_publish_fails_keeps_the_dead_letter() -> None:
    store = _store()
    store.fail_publish = True
    with pytest.raises(Unavailable):
        await DeadLetters(store).replay(5)
    assert 5 in store.messages
    store.fail_publish = False
    await DeadLetters(store).replay(5)
    assert 5 not in store.messages


async def test_a_dead_letter_that_is_no_cloud_event_is_still_shown() -> None:
    message = StoredMessage(
        sequence=7,
        subject="dlq.plinth.job.finished",
        headers={
            "plinth-dlq-reason": "MalformedEvent: missing ce-id",
            "plinth-dlq-deliveries": "1",
        },
        data=b"\xff\xfe",
        stored_at=WHEN,
    )
    letter = await DeadLetters(FakeStore([message])).get(7)
    proto = dead_letter_to_proto(letter)
    assert (proto.subject, proto.event_id, proto.data_json, proto.data) == (
        "plinth.job.finished",
        "",
        "",
        b"\xff\xfe",
    )
    assert letter.replay_id() == "message:replay:7"


async def test_a_live_watch_is_pinned_after_the_newest_event() -> None:
    streams = EventStreams(FakeSource(EVENTS))
    assert await streams.pin(StartPoint()) == StartPoint(after_sequence=len(EVENTS))
    assert await streams.pin(StartPoint(after_sequence=1)) == StartPoint(after_sequence=1)
    assert await streams.pin(StartPoint(since=WHEN)) == StartPoint(since=WHEN)
