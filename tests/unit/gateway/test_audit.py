"""The audit writer: records stored in batches with their events, a flood bounded (dropped and
counted, never queued without limit), a failing store not ending the writer; what a request
names (team, resource) as the audit row shows it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from plinth.gateway.v1 import gateway_pb2
from plinth.registry.v1 import registry_pb2
from plinth.scheduler.v1 import scheduler_pb2
from services.gateway.audit import AuditLog
from services.gateway.auth import describe_request
from services.gateway.identity import AuditEntry


def _entry(n: int) -> AuditEntry:
    return AuditEntry(
        time=datetime.now(UTC),
        principal="",
        principal_kind="",
        method="/m",
        permission="p",
        team="",
        resource=str(n),
        outcome="UNAUTHENTICATED",
        message="",
        trace_id="",
    )


class Sink:
    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[list[AuditEntry]] = []
        self.fail = fail

    async def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        if self.fail:
            raise RuntimeError("database down")
        self.batches.append(list(entries))


async def test_a_flood_is_bounded_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink()
    log = AuditLog(sink, max_pending=100)
    for n in range(10_000):  # the writer is not running: nothing drains
        log.record(_entry(n))
    assert log.pending == 100 and log.dropped == 9_900
    assert caplog.text.count("audit queue full") == 1  # one warning, not one per record
    await log.start()
    await log.stop()
    assert sum(len(b) for b in sink.batches) == 100 and log.stored == 100


async def test_records_are_stored_in_the_background_in_batches() -> None:
    sink = Sink()
    log = AuditLog(sink, batch_size=10)
    await log.start()
    for n in range(35):
        log.record(_entry(n))
    for _ in range(100):
        if log.stored == 35:
            break
        await asyncio.sleep(0.01)
    await log.stop()
    assert [e.resource for b in sink.batches for e in b] == [str(n) for n in range(35)]
    assert max(len(b) for b in sink.batches) <= 11


async def test_a_failing_store_does_not_end_the_writer(caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink(fail=True)
    log = AuditLog(sink)
    await log.start()
    log.record(_entry(1))
    await asyncio.sleep(0.05)
    sink.fail = False
    log.record(_entry(2))
    for _ in range(100):
        if log.stored:
            break
        await asyncio.sleep(0.01)
    await log.stop()
    assert [e.resource for b in sink.batches for e in b] == ["2"]
    assert "cannot store 1 audit records" in caplog.text


def test_what_a_request_names() -> None:
    submit = scheduler_pb2.SubmitJobRequest(spec=scheduler_pb2.JobSpec(name="train", team="ml"))
    assert describe_request(submit) == ("ml", "train")
    assert describe_request(scheduler_pb2.CancelJobRequest(job_id="j-1")) == ("", "j-1")
    alias = registry_pb2.SetAliasRequest(name="diabetes", alias="production", version="3")
    assert describe_request(alias)[1] == "diabetes@production"
    member = gateway_pb2.AddMemberRequest(team="vision", user="ann")
    assert describe_request(member) == ("vision", "ann@vision")
    assert describe_request(gateway_pb2.CreateTeamRequest(name="nlp")) == ("nlp", "nlp")
    assert describe_request(None) == ("", "")
