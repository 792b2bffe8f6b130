"""Gateway domain logic: which platform events a watcher asked for, and from where; the dead
letters, listed and replayed. No grpc or nats imports."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from plinth_common.errors import InvalidArgument, NotFound
from plinth_common.events.envelope import CATALOG, CloudEvent, MalformedEvent
from plinth_common.paging import check_page_size, decode_token, encode_token

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
    """Event types (empty: all), a team (empty: all), and the teams the watcher may see.

    Attributes:
        visible: the watcher's teams; None: every team (an admin). A watcher who is no admin
            never gets an event of another team, nor one that names no team.
    """

    types: frozenset[str]
    team: str
    visible: frozenset[str] | None = None

    def matches(self, event: CloudEvent) -> bool:
        """Whether a watcher with this filter wants ``event``."""
        return (
            (not self.types or event.type in self.types)
            and (not self.team or event.team == self.team)
            and (self.visible is None or event.team in self.visible)
        )


def make_filter(
    types: Iterable[str], team: str, visible: frozenset[str] | None = None
) -> EventFilter:
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
    return EventFilter(types=frozenset(normalized), team=team, visible=visible)


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
        self,
        types: Iterable[str],
        team: str,
        *,
        start: StartPoint | None = None,
        visible: frozenset[str] | None = None,
    ) -> AsyncIterator[AsyncIterator[StreamedEvent]]:
        """A watch: once entered, the matching events from ``start`` on (default: new events
        only), then the ones that happen; only events of the ``visible`` teams (None: all).

        Raises:
            InvalidArgument: an unknown event type, or a resume point past the newest event
                (both before subscribing).
        """
        event_filter = make_filter(types, team, visible)
        start = start or StartPoint()
        if start.after_sequence is not None:
            await self._check_resume_point(start.after_sequence)
        async with (
            self._source.subscribe(types=event_filter.types, start=start) as events,
            aclosing(_matching(events, event_filter)) as matching,
        ):
            yield matching

    async def pin(self, start: StartPoint) -> StartPoint:
        """A live start as the resume point it stands for: after the newest event now.

        The watch then has a resume point before its first event arrives, and following it is
        exactly "new events only" (nothing published after this call is missed).
        """
        if start.is_live:
            return StartPoint(after_sequence=await self._source.last_sequence())
        return start

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


# --------------------------------------------------------------------------- dead letters

#: Headers the consumer adds when it dead-letters an event (lib/plinth_common/events/consumer.py).
DLQ_REASON = "plinth-dlq-reason"
DLQ_CONSUMER = "plinth-dlq-consumer"
DLQ_DELIVERIES = "plinth-dlq-deliveries"
DLQ_SUBJECT = "plinth-dlq-subject"
_DLQ_HEADERS = frozenset({DLQ_REASON, DLQ_CONSUMER, DLQ_DELIVERIES, DLQ_SUBJECT})
_MSG_ID = "Nats-Msg-Id"
DEAD_LETTER_PAGES = "dead-letters"


@dataclass(frozen=True, kw_only=True)
class StoredMessage:
    """A message of the dead-letter stream as stored: its subject there (``dlq.<original>``),
    headers and payload."""

    sequence: int
    subject: str
    headers: Mapping[str, str]
    data: bytes
    stored_at: datetime | None


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """An event a consumer gave up on: what failed, why, after how many deliveries, and when."""

    sequence: int
    subject: str
    consumer: str
    reason: str
    deliveries: int
    dead_lettered_at: datetime | None
    headers: Mapping[str, str]
    data: bytes

    @classmethod
    def of(cls, message: StoredMessage, *, prefix: str) -> DeadLetter:
        """Reads the consumer's headers off a stored message."""
        headers = message.headers
        try:
            deliveries = int(headers.get(DLQ_DELIVERIES, "0"))
        except ValueError:
            deliveries = 0
        return cls(
            sequence=message.sequence,
            subject=headers.get(DLQ_SUBJECT) or message.subject.removeprefix(prefix),
            consumer=headers.get(DLQ_CONSUMER, ""),
            reason=headers.get(DLQ_REASON, ""),
            deliveries=deliveries,
            dead_lettered_at=message.stored_at,
            headers=headers,
            data=message.data,
        )

    @property
    def event_id(self) -> str:
        """The original event's ``ce-id`` ('' for a message that was no CloudEvent)."""
        return self.headers.get("ce-id", "")

    @property
    def event_type(self) -> str:
        """The original event's ``ce-type``."""
        return self.headers.get("ce-type", "")

    @property
    def team(self) -> str:
        """The original event's team."""
        return self.headers.get("ce-team", "")

    def event(self) -> CloudEvent | None:
        """The original event, or None when its headers do not make one."""
        try:
            return CloudEvent.from_headers(self.original_headers(), self.data)
        except MalformedEvent:
            return None

    def original_headers(self) -> dict[str, str]:
        """The headers the event was published with (the consumer's own and the message id
        it gave the dead letter removed)."""
        return {k: v for k, v in self.headers.items() if k not in _DLQ_HEADERS and k != _MSG_ID}

    def replay_id(self) -> str:
        """The ``Nats-Msg-Id`` of its replay: new (JetStream would drop the original id as a
        duplicate within its window), yet the same on a retried replay of this dead letter, so
        a replay whose removal failed and is run again publishes once."""
        return f"{self.event_id or 'message'}:replay:{self.sequence}"


@dataclass(frozen=True, kw_only=True)
class DeadLetterFilter:
    """Which dead letters a listing shows (empty fields: all)."""

    consumer: str = ""
    type: str = ""
    team: str = ""

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` is listed."""
        return (
            (not self.consumer or letter.consumer == self.consumer)
            and (not self.type or letter.subject == self.type)
            and (not self.team or letter.team == self.team)
        )


@dataclass(frozen=True, kw_only=True)
class Replayed:
    """A replayed dead letter and the sequence its event got in the event stream."""

    dead_letter: DeadLetter
    event_sequence: int


class DeadLetterStore(Protocol):
    """The stream that keeps dead letters, and the one their events go back to."""

    prefix: str

    async def next_message(self, after: int, *, subject: str) -> StoredMessage | None:
        """The first message with a sequence greater than ``after`` on ``subject`` (wildcards
        allowed), or None."""
        ...

    async def message(self, sequence: int) -> StoredMessage | None:
        """The message at ``sequence``, or None (never there, or removed)."""
        ...

    async def publish(self, subject: str, headers: Mapping[str, str], data: bytes) -> int:
        """Publishes to the event stream; returns the stored sequence."""
        ...

    async def remove(self, sequence: int) -> None:
        """Removes the dead letter at ``sequence`` (gone already: nothing to do)."""
        ...


class DeadLetters:
    """Lists, shows and replays the dead letters.

    Args:
        store: where they are kept.
        max_scanned: the most dead letters one page reads while filtering, so a filter that
            matches little answers in bounded time (the page then ends early, with a token).
    """

    def __init__(self, store: DeadLetterStore, *, max_scanned: int = 5000) -> None:
        self._store = store
        self._max_scanned = max_scanned

    async def list(
        self, *, page_size: int, page_token: str, where: DeadLetterFilter
    ) -> tuple[list[DeadLetter], str]:
        """A page of dead letters, oldest first, and the next page's token ('' at the end).

        Raises:
            InvalidArgument: a bad page size or token.
        """
        limit = check_page_size(page_size)
        after = decode_token(page_token, DEAD_LETTER_PAGES) if page_token else 0
        if after < 0:
            raise InvalidArgument("page_token", "not a token this server issued")
        where = replace(where, type=_full_type(where.type))
        subject = self._store.prefix + (where.type or ">")
        found: list[DeadLetter] = []
        for _ in range(self._max_scanned):
            message = await self._store.next_message(after, subject=subject)
            if message is None:
                return found, ""
            after = message.sequence
            letter = DeadLetter.of(message, prefix=self._store.prefix)
            if where.matches(letter):
                found.append(letter)
                if len(found) == limit:
                    break
        # A full page, or the scan bound: the next page goes on from the last one read.
        return found, encode_token(DEAD_LETTER_PAGES, after)

    async def get(self, sequence: int) -> DeadLetter:
        """The dead letter at ``sequence``.

        Raises:
            InvalidArgument: sequence 0.
            NotFound: none there (never, or replayed already).
        """
        if sequence < 1:
            raise InvalidArgument(
                "sequence", f"a dead letter's sequence is 1 or more, not {sequence}"
            )
        message = await self._store.message(sequence)
        if message is None or not message.subject.startswith(self._store.prefix):
            raise NotFound(
                "dead letter",
                str(sequence),
                hint="it was replayed already or never existed; `plinth events dlq list` shows "
                "the dead letters",
            )
        return DeadLetter.of(message, prefix=self._store.prefix)

    async def replay(self, sequence: int) -> Replayed:
        """Republishes the dead letter's event to its original subject (same ``ce-id``, a new
        message id), then removes the dead letter.

        Raises:
            InvalidArgument: sequence 0.
            NotFound: no dead letter there.
        """
        letter = await self.get(sequence)
        headers = letter.original_headers()
        headers[_MSG_ID] = letter.replay_id()
        event_sequence = await self._store.publish(letter.subject, headers, letter.data)
        # Removed only after the publish is stored: a failure in between leaves the dead letter,
        # and replaying it again publishes the same message id, which JetStream drops.
        await self._store.remove(sequence)
        return Replayed(dead_letter=letter, event_sequence=event_sequence)


_SUBJECT_TOKENS = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _full_type(name: str) -> str:
    """``job.finished`` -> ``plinth.job.finished``; unknown types are allowed (a dead letter may
    be an event no catalog knows), but not wildcards or characters no subject has.

    Raises:
        InvalidArgument: a type that cannot be a subject.
    """
    if not name:
        return name
    if len(name) > 255 or not _SUBJECT_TOKENS.fullmatch(name):
        raise InvalidArgument(
            "type",
            f"{name[:80]!r} is not an event type; expected dot-separated words like job.finished",
        )
    return name if name.startswith(TYPE_PREFIX) else TYPE_PREFIX + name
