"""The scheduler's store, outbox and processed-events table on PostgreSQL."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.auth import Role
from plinth_common.nats_server import NatsServer
from services.scheduler.app import SchedulerApp, SchedulerSettings
from services.scheduler.store import outbox_table
from tests.helpers import EventRecorder, channel_as, eventually, member, service_env

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def test_scheduler_runs_jobs_on_postgres(
    tmp_path: Path, nats_server: NatsServer, postgres_database: str
) -> None:
    env = service_env(
        tmp_path,
        nats_server.url,
        PLINTH_SCHEDULER_DATABASE_URL=postgres_database,
        PLINTH_SCHEDULER_MLFLOW_AUTH="none",  # no registry here
    )
    app = SchedulerApp(SchedulerSettings.from_env(env))
    await app.start()
    try:
        async with (
            channel_as(f"127.0.0.1:{app.port}", member("pg", ml=Role.DEVELOPER)) as channel,
            EventRecorder(nats_server.url) as recorder,
        ):
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            job = (
                await stub.SubmitJob(
                    pb.SubmitJobRequest(
                        spec=pb.JobSpec(
                            name="pg", team="ml", entrypoint=[sys.executable, "-c", "print(1)"]
                        )
                    )
                )
            ).job

            async def done() -> pb.Job | None:
                got = await stub.GetJob(pb.GetJobRequest(job_id=job.id))
                return got if got.state == pb.JOB_STATE_SUCCEEDED else None

            await eventually(done)

            async def all_events() -> bool:
                return len(recorder.of(job.id)) == 4

            await eventually(all_events)
            listed = await stub.ListJobs(pb.ListJobsRequest(team="ml"))
            assert [j.id for j in listed.jobs] == [job.id]
            # The team filter by a set of teams, in PostgreSQL's SQL.
            assert [j.id for j in (await stub.ListJobs(pb.ListJobsRequest())).jobs] == [job.id]
        async with app.runtime.db.read() as session:
            unpublished = (
                await session.execute(
                    sa.select(sa.func.count()).where(outbox_table.c.published_at.is_(None))
                )
            ).scalar_one()
        assert unpublished == 0
    finally:
        await app.stop()
