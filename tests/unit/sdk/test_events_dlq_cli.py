"""``plinth events dlq list|show|replay`` and ``plinth.events.dead_letters/dead_letter/replay``
against an in-test fake gateway (a real gRPC server): what a person sees, the requests sent
(filters, paging), and the error line for a dead letter that is gone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common.errors import NotFound
from plinth_common.rich_status import DETAILS_KEY, status_of
from plinth_sdk import Plinth, cli
from plinth_sdk.errors import NotFound as ClientNotFound


def _letter(sequence: int, *, reason: str = "RuntimeError: boom") -> gateway_pb2.DeadLetter:
    return gateway_pb2.DeadLetter(
        sequence=sequence,
        subject="plinth.job.finished",
        event_id=f"ev-{sequence}",
        event_type="plinth.job.finished",
        event_subject=f"j-{sequence}",
        team="ml",
        event_time=Timestamp(seconds=1_740_830_400),
        consumer="registry-job-finished",
        reason=reason,
        deliveries=5,
        dead_lettered_at=Timestamp(seconds=1_740_830_460),
        data=b"\x0a\x03j-1",
        data_json='{"job_id": "j-1"}',
    )


@dataclass
class FakeDeadLetters(gateway_pb2_grpc.EventServiceServicer):
    """Two pages of dead letters; replays remove them."""

    letters: dict[int, gateway_pb2.DeadLetter] = field(
        default_factory=lambda: {s: _letter(s) for s in (3, 7, 8)}
    )
    list_requests: list[gateway_pb2.ListDeadLettersRequest] = field(default_factory=list)

    def ListDeadLetters(
        self, request: gateway_pb2.ListDeadLettersRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ListDeadLettersResponse:
        self.list_requests.append(request)
        ordered = [self.letters[s] for s in sorted(self.letters)]
        start = int(request.page_token or 0)
        page = ordered[start : start + 2]
        token = str(start + 2) if start + 2 < len(ordered) else ""
        return gateway_pb2.ListDeadLettersResponse(dead_letters=page, next_page_token=token)

    def GetDeadLetter(
        self, request: gateway_pb2.GetDeadLetterRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.DeadLetter:
        if request.sequence not in self.letters:
            _not_found(context, request.sequence)
        return self.letters[request.sequence]

    def ReplayDeadLetter(
        self, request: gateway_pb2.ReplayDeadLetterRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ReplayDeadLetterResponse:
        if request.sequence not in self.letters:
            _not_found(context, request.sequence)
        letter = self.letters.pop(request.sequence)
        return gateway_pb2.ReplayDeadLetterResponse(dead_letter=letter, event_sequence=120)


def _not_found(context: grpc.ServicerContext, sequence: int) -> None:
    error = NotFound("dead letter", str(sequence), hint="it was replayed already")
    status = status_of(error, code=grpc.StatusCode.NOT_FOUND, domain="gateway.plinth")
    context.abort_with_status(_Status(status.SerializeToString(), error.message))


@dataclass(frozen=True)
class _Status(grpc.Status):
    raw: bytes
    details: str
    code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND

    @property
    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ((DETAILS_KEY, self.raw),)


@dataclass
class Gateway:
    address: str
    fake: FakeDeadLetters

    def run(self, *args: str) -> int:
        return cli.main(["--gateway", self.address, *args])


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    fake = FakeDeadLetters()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gateway_pb2_grpc.add_EventServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Gateway(f"127.0.0.1:{port}", fake)
    finally:
        server.stop(grace=None)


def test_list_shows_what_failed_why_and_how_often(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.fake.letters[8] = _letter(8, reason="FailedPrecondition: " + "x" * 200)
    assert gateway.run("events", "dlq", "list", "--type", "job.finished", "--team", "ml") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "SEQ", "DEAD-LETTERED", "TYPE", "SUBJECT", "TEAM", "CONSUMER", "TRIES", "REASON",
    ]  # fmt: skip
    assert lines[1].split()[:8] == [
        "3", "2025-03-01T12:01:00Z", "plinth.job.finished", "j-3", "ml",
        "registry-job-finished", "5", "RuntimeError:",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["3", "7", "8"]  # both pages
    assert lines[3].rstrip().endswith("…") and len(lines[3].split("FailedPrecondition")[1]) < 90
    assert [(r.type, r.team, r.consumer, r.page_token) for r in gateway.fake.list_requests] == [
        ("job.finished", "ml", "", ""),
        ("job.finished", "ml", "", "2"),
    ]


def test_list_with_nothing_says_so(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.fake.letters.clear()
    assert gateway.run("events", "dlq", "list") == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "No dead letters.\n")


def test_show_prints_every_field_and_the_payload(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("events", "dlq", "show", "7") == 0
    out = capsys.readouterr().out
    for expected in (
        "Event id       ev-7",
        "Consumer       registry-job-finished",
        "Deliveries     5",
        "Reason         RuntimeError: boom",
        'Payload        {"job_id":"j-1"}',
    ):
        assert " ".join(expected.split()) in [" ".join(line.split()) for line in out.splitlines()]


def test_replay_says_what_was_republished_and_a_second_replay_is_not_found(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("events", "dlq", "replay", "3") == 0
    captured = capsys.readouterr()
    assert captured.out == "replayed dead letter 3: plinth.job.finished ev-3 is event 120 again\n"
    assert captured.err == "follow it with: plinth events watch --after 119\n"
    assert gateway.run("events", "dlq", "replay", "3") == 1
    assert "dead letter '3' not found; it was replayed already" in capsys.readouterr().err


def test_json_output(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert gateway.run("events", "dlq", "list", "-o", "json", "--limit", "1") == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["sequence"], listed["reason"], listed["data"]) == (
        3,
        "RuntimeError: boom",
        {"job_id": "j-1"},
    )
    assert gateway.run("events", "dlq", "replay", "7", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["event_sequence"] == 120


def test_sdk_dead_letters_page_and_raise_typed_errors(gateway: Gateway) -> None:
    with Plinth(gateway.address) as plinth:
        assert [d.sequence for d in plinth.events.dead_letters(page_size=2)] == [3, 7, 8]
        letter = plinth.events.dead_letter(8)
        assert (letter.event_id, letter.deliveries, letter.data) == ("ev-8", 5, {"job_id": "j-1"})
        assert plinth.events.replay(8).dead_letter.sequence == 8
        with pytest.raises(ClientNotFound):
            plinth.events.dead_letter(8)
        with pytest.raises(ValueError, match="page_size"):
            list(plinth.events.dead_letters(page_size=0))
