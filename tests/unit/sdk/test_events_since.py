"""Where ``plinth events watch`` and ``plinth.events.watch`` start: the request they send for
``--since`` / ``--after`` (and without them), the durations the CLI understands, its usage errors,
and the sequence it prints so a user can resume. The transport is faked (no server)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from plinth.gateway.v1 import gateway_pb2
from plinth_sdk import Transport
from plinth_sdk.cli import plinth
from plinth_sdk.cli.events import parse_since
from plinth_sdk.events import EventsAPI
from plinth_sdk.models import Event

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class StreamTransport(Transport):
    """Answers the one stream call with ``events`` and records its request."""

    def __init__(self, events: list[gateway_pb2.Event]) -> None:
        super().__init__("fake:0", timeout=1.0, channel=grpc.insecure_channel("127.0.0.1:1"))
        self.events = events
        self.requests: list[gateway_pb2.WatchEventsRequest] = []

    def stream(
        self, method: Callable[..., Any], request: Any, *, timeout: float | None
    ) -> Iterator[Any]:
        self.requests.append(request)
        yield from self.events


def _request(**options: Any) -> gateway_pb2.WatchEventsRequest:
    transport = StreamTransport([])
    assert list(EventsAPI(transport).watch(**options)) == []
    (request,) = transport.requests
    return request


# --------------------------------------------------------------------------- SDK


def test_sdk_without_a_start_point_asks_for_new_events_only() -> None:
    request = _request(types=["job.finished"], team="ml")
    assert not request.HasField("since") and not request.HasField("after_sequence")
    assert (list(request.types), request.team) == (["job.finished"], "ml")


def test_sdk_since_is_sent_in_utc_naive_meaning_utc() -> None:
    paris = timezone(timedelta(hours=1))
    assert _request(since=datetime(2026, 3, 1, 13, 0, tzinfo=paris)).since.ToDatetime(
        tzinfo=UTC
    ) == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert _request(since=datetime(2026, 3, 1, 12, 0)).since.ToDatetime(tzinfo=UTC) == NOW


def test_sdk_after_sequence_zero_is_sent_as_a_start_point() -> None:
    assert _request(after_sequence=0).HasField("after_sequence")
    assert _request(after_sequence=41).after_sequence == 41


def test_sdk_start_points_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        EventsAPI(StreamTransport([])).watch((), None, NOW)  # type: ignore[misc]


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", NOW - timedelta(minutes=10)),
        ("2h", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
        ("30s", NOW - timedelta(seconds=30)),
        ("1.5h", NOW - timedelta(minutes=90)),
        (" 2H ", NOW - timedelta(hours=2)),
        ("2026-02-28T08:30:00Z", datetime(2026, 2, 28, 8, 30, tzinfo=UTC)),
        ("2026-02-28T09:30:00+01:00", datetime(2026, 2, 28, 8, 30, tzinfo=UTC)),
        ("2026-02-28T08:30", datetime(2026, 2, 28, 8, 30, tzinfo=UTC)),  # naive: UTC
        ("2026-02-28", datetime(2026, 2, 28, tzinfo=UTC)),
    ],
)
def test_since_durations_and_times(text: str, expected: datetime) -> None:
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["10", "m", "10 minutes", "-5m", "1w", "yesterday", ""])
def test_since_refuses_anything_else_showing_both_forms(text: str) -> None:
    with pytest.raises(ValueError, match="duration like 10m, 2h, 1d or an ISO 8601 time") as err:
        parse_since(text, now=NOW)
    assert repr(text) in str(err.value)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> StreamTransport:
    """Every Transport's stream answers from this one's events."""
    fake = StreamTransport([])
    monkeypatch.setattr(Transport, "stream", lambda _self, *args, **kw: fake.stream(*args, **kw))
    return fake


def run(*args: str) -> Result:
    return CliRunner().invoke(plinth, ["--gateway", "127.0.0.1:1", "events", "watch", *args])


def test_cli_since_a_duration_asks_for_that_long_ago(transport: StreamTransport) -> None:
    before = datetime.now(UTC)
    result = run("--since", "10m", "--type", "job.finished")
    after = datetime.now(UTC)
    assert result.exit_code == 0, result.output
    (request,) = transport.requests
    since = request.since.ToDatetime(tzinfo=UTC)
    assert before - timedelta(minutes=10) <= since <= after - timedelta(minutes=10)
    assert not request.HasField("after_sequence") and list(request.types) == ["job.finished"]


def test_cli_after_resumes_and_no_option_follows_new_events(transport: StreamTransport) -> None:
    assert run("--after", "41").exit_code == 0
    assert run().exit_code == 0
    resumed, live = transport.requests
    assert resumed.HasField("after_sequence") and resumed.after_sequence == 41
    assert not resumed.HasField("since")
    assert not live.HasField("after_sequence") and not live.HasField("since")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "Invalid value for '--since': expected a duration like 10m"),
        (["--after", "-1"], "Invalid value for '--after': expected a whole number >= 0"),
        (["--since", "1h", "--after", "3"], "--since and --after cannot be combined"),
    ],
)
def test_cli_usage_errors_name_the_flag(
    transport: StreamTransport, args: list[str], message: str
) -> None:
    result = run(*args)
    assert result.exit_code == 2 and message in result.output
    assert transport.requests == []


_HAS_SEQUENCE = "sequence" in {f.name for f in dataclasses.fields(Event)}


@pytest.mark.skipif(not _HAS_SEQUENCE, reason="models.Event.sequence is not there yet")
def test_cli_prints_each_events_sequence_to_resume_from(transport: StreamTransport) -> None:
    transport.events = [
        gateway_pb2.Event(
            id="e-1", type="plinth.job.finished", subject="j-1", team="ml", sequence=12
        ),
        gateway_pb2.Event(id="e-2", type="plinth.model.promoted", subject="fraud", sequence=15),
    ]
    table = run("--since", "1d")
    assert table.exit_code == 0
    assert table.stdout.splitlines() == [
        "12 - plinth.job.finished j-1 ml {}",
        "15 - plinth.model.promoted fraud - {}",
    ]
    rows = [json.loads(line) for line in run("-o", "json").stdout.splitlines()]
    assert [(row["sequence"], row["id"]) for row in rows] == [(12, "e-1"), (15, "e-2")]
