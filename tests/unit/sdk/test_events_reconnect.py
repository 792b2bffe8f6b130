"""``plinth.events.watch`` when its stream breaks: it reconnects with a growing delay and resumes
right after the last event it yielded (or the resume point the gateway named before any
event), so nothing is missed or yielded twice; a first connection that fails, or reconnect off,
raises at once. The stub is faked (no server), the real Transport translates its errors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from plinth.gateway.v1 import gateway_pb2
from plinth_sdk import Transport
from plinth_sdk.errors import GatewayUnreachable, InvalidArgument, Unavailable
from plinth_sdk.events import EventsAPI
from tests.unit.sdk.rpc_errors import FakeRpcError

BROKEN = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")


@dataclass
class Attempt:
    """One call's script: whether the gateway got the watch in place, the events it sends,
    then how it ends (None: the stream ends normally)."""

    live: bool = True
    after: int | None = None
    events: list[int] = field(default_factory=list)
    then: Exception | None = BROKEN


class FakeCall:
    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt
        self.cancelled = False

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        if not self._attempt.live:
            return ()
        metadata = [("plinth-watch", "live")]
        if self._attempt.after is not None:
            metadata.append(("plinth-watch-after", str(self._attempt.after)))
        return tuple(metadata)

    def __iter__(self) -> Iterator[gateway_pb2.Event]:
        for sequence in self._attempt.events:
            yield gateway_pb2.Event(
                id=f"e-{sequence}", type="plinth.job.finished", sequence=sequence
            )
        if self._attempt.then is not None:
            raise self._attempt.then

    def cancel(self) -> None:
        self.cancelled = True


class FakeStub:
    def __init__(self, attempts: list[Attempt]) -> None:
        self.attempts = attempts
        self.requests: list[gateway_pb2.WatchEventsRequest] = []

    def WatchEvents(self, request: gateway_pb2.WatchEventsRequest, timeout: Any) -> FakeCall:
        self.requests.append(request)
        if not self.attempts:
            raise AssertionError("no more attempts scripted")
        return FakeCall(self.attempts.pop(0))


class ScriptedTransport(Transport):
    def __init__(self, stub: FakeStub) -> None:
        super().__init__("fake:0", timeout=1.0, channel=grpc.insecure_channel("127.0.0.1:1"))
        self.fake = stub

    def stub(self, factory: Any) -> Any:
        return self.fake


def _api(*attempts: Attempt) -> tuple[EventsAPI, FakeStub, list[float]]:
    stub = FakeStub(list(attempts))
    slept: list[float] = []
    return EventsAPI(ScriptedTransport(stub), sleep=slept.append), stub, slept


def _resume_points(stub: FakeStub) -> list[int | None]:
    return [r.after_sequence if r.HasField("after_sequence") else None for r in stub.requests]


def test_a_broken_stream_resumes_after_the_last_event_without_repeats() -> None:
    api, stub, slept = _api(
        Attempt(after=10, events=[11, 12]),
        # The gateway restarts: the first attempt finds it down, the next one is live again.
        Attempt(live=False, events=[], then=FakeRpcError(grpc.StatusCode.UNAVAILABLE, "refused")),
        Attempt(after=12, events=[12, 13, 14], then=None),  # a repeat of 12 is dropped
    )
    assert [e.sequence for e in api.watch(types=["job.finished"], team="ml")] == [11, 12, 13, 14]
    assert _resume_points(stub) == [None, 12, 12]
    assert [(list(r.types), r.team) for r in stub.requests] == [(["job.finished"], "ml")] * 3
    assert len(slept) == 2 and 0 < slept[0] <= slept[1] + 0.2 and all(s <= 5.2 for s in slept)


def test_a_stream_that_breaks_before_any_event_resumes_at_the_point_the_gateway_named() -> None:
    api, stub, _ = _api(Attempt(after=41, events=[]), Attempt(after=41, events=[42], then=None))
    assert [e.sequence for e in api.watch()] == [42]
    assert _resume_points(stub) == [None, 41]


def test_a_since_watch_keeps_its_since_until_an_event_arrives() -> None:
    since = datetime(2026, 3, 1, tzinfo=UTC)
    api, stub, _ = _api(Attempt(events=[]), Attempt(events=[5], then=BROKEN), Attempt(then=None))
    assert [e.sequence for e in api.watch(since=since)] == [5]
    assert [r.HasField("since") for r in stub.requests] == [True, True, False]
    assert _resume_points(stub) == [None, None, 5]


def test_the_first_connection_failing_raises_at_once() -> None:
    api, stub, slept = _api(
        Attempt(live=False, then=FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect"))
    )
    with pytest.raises(GatewayUnreachable):
        list(api.watch())
    assert len(stub.requests) == 1 and slept == []


def test_without_reconnect_a_broken_stream_raises() -> None:
    api, stub, _ = _api(Attempt(after=3, events=[4]))
    seen: list[int] = []
    with pytest.raises(Unavailable):
        for event in api.watch(reconnect=False):
            seen.append(event.sequence)
    assert seen == [4] and len(stub.requests) == 1


def test_a_refused_resume_point_is_not_retried() -> None:
    refused = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "after_sequence: past the newest")
    api, stub, _ = _api(Attempt(after=3, events=[4]), Attempt(live=False, then=refused))
    with pytest.raises(InvalidArgument):
        list(api.watch())
    assert len(stub.requests) == 2


def test_it_gives_up_after_reconnect_for_s() -> None:
    down = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect")
    attempts = [Attempt(after=1, events=[2])] + [Attempt(live=False, then=down)] * 50
    api, stub, slept = _api(*attempts)
    with pytest.raises(Unavailable):
        list(api.watch(reconnect_for_s=0.0))
    assert len(stub.requests) == 2 and len(slept) == 1  # one retry, then past the budget
