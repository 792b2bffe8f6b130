"""Chaos: the embedded nats-server of ``make run`` killed with SIGKILL comes back by itself.

A job submitted while NATS is down is accepted (its events wait in the scheduler's outbox);
the supervisor restarts nats-server on its port and store; the services reconnect; the stream
then holds exactly one ``plinth.job.finished`` for that job and for one submitted afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import grpc
import pytest

from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.auth import bearer_interceptors
from plinth_common.net import port_accepts
from tests.chaos.conftest import StartPlatform, event_counts
from tests.helpers import eventually

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="session")]
RECOVERY_BOUND_S = 30.0
EVENTS_BOUND_S = 45.0
FINISHED = "plinth.job.finished"


async def _submit(stub: scheduler_pb2_grpc.SchedulerServiceStub, name: str) -> str:
    spec = pb.JobSpec(name=name, team="chaos", entrypoint=[sys.executable, "-c", "print('ok')"])
    return (await stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=10)).job.id


async def test_nats_killed_is_restarted_and_no_event_is_lost(
    chaos_platform: StartPlatform,
) -> None:
    platform = await chaos_platform(services=("scheduler", "gateway"))
    nats = platform.nats
    assert nats is not None and nats.pid is not None
    old_pid = nats.pid
    killed = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    async with grpc.aio.insecure_channel(
        platform.address("gateway"), interceptors=bearer_interceptors(platform.admin_key)
    ) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        during = await _submit(stub, "chaos-during-outage")  # the outbox keeps its events

        async def listening() -> bool | None:
            pid = nats.pid
            restarted = pid is not None and pid != old_pid
            up = restarted and await port_accepts(nats.host, nats.port, timeout=0.2)
            return True if up else None

        await eventually(listening, timeout=RECOVERY_BOUND_S, interval=0.1)
        recovered_s = time.monotonic() - killed
        after = await _submit(stub, "chaos-after-outage")

    async def both_finished() -> bool | None:
        counts = await event_counts(platform.nats_url, FINISHED)
        return True if counts[during] and counts[after] else None

    await eventually(both_finished, timeout=EVENTS_BOUND_S, interval=0.5)
    counts = await event_counts(platform.nats_url, FINISHED)
    lost = sum(1 for job in (during, after) if counts[job] == 0)
    duplicates = sum(max(counts[job] - 1, 0) for job in (during, after))
    print(
        f"\nCHAOS nats-server killed: restarted in {recovered_s:.1f} s; events lost: {lost}; "
        f"duplicate effects: {duplicates}",
        flush=True,
    )
    assert (lost, duplicates) == (0, 0), dict(counts)
    assert recovered_s < RECOVERY_BOUND_S
