"""The scheduler service with its flavors' executors behind a FlavorRouter: an unreachable
engine (a real RayExecutor against a port that hangs up), an engine that refuses the job, and
a preemption the engine reports."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa

from plinth_common.db import Database
from plinth_common.errors import InvalidArgument
from plinth_common.events import Outbox
from services.scheduler.app import MIGRATIONS
from services.scheduler.domain import (
    EndReason,
    ExitStatus,
    FailureKind,
    Job,
    JobSpec,
    JobState,
    Outcome,
    Resources,
    RetryPolicy,
    judge,
)
from services.scheduler.events import OutboxJobEvents
from services.scheduler.executor import Executor
from services.scheduler.executors.router import FlavorRouter, build_executor
from services.scheduler.executors.slurm import SlurmJobRejected
from services.scheduler.metrics import PENDING_REASONS, pending_reason_class
from services.scheduler.queueing.model import QueueConfig, ResourceFlavor
from services.scheduler.service import JobEnvironment, SchedulerService
from services.scheduler.store import SqlJobStore, outbox_table
from tests.helpers import ADMIN
from tests.unit.scheduler.fakes import FakeExecutor, FakeHandle

ASYNC = pytest.mark.asyncio(loop_scope="session")

TOKEN = "ray-secret-token-4f1c9e"


class HangUp:
    """A TCP port that accepts and closes at once: an engine that is down. Counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HangUp:
        async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


class RefusingExecutor(FakeExecutor):
    """An engine that refuses every job, as sbatch does an unknown partition."""

    async def launch(self, job: Job, env: Mapping[str, str]) -> FakeHandle:
        self.attempts.append((job.id, job.attempt))
        raise SlurmJobRejected("sbatch: error: invalid partition specified: nope")


def queues(ray_port: int, token_file: Path) -> str:
    return f"""
flavors:
  - {{name: cpu}}
  - name: ray
    executor: ray
    executor_options: {{address: "http://127.0.0.1:{ray_port}", token_file: "{token_file}"}}
  - {{name: slurm, executor: slurm, executor_options: {{partition: nope}}}}
cluster_queues:
  - {{name: ml-queue, teams: [ml], flavors: [{{flavor: cpu, resources: {{cpu: {{nominal: 2}}, memory: {{nominal: 8Gi}}}}}}]}}
  - {{name: gpu-queue, teams: [vision], flavors: [{{flavor: ray, resources: {{cpu: {{nominal: 4}}, memory: {{nominal: 8Gi}}}}}}]}}
  - name: hpc-queue
    teams: [research]
    flavors: [{{flavor: slurm, resources: {{cpu: {{nominal: 4}}, memory: {{nominal: 8Gi}}}}}}]
"""


class Wired:
    """A service whose flavors' executors are built from the configuration, as the app does."""

    def __init__(self, store: SqlJobStore, jobs_dir: Path, local: FakeExecutor) -> None:
        self.local = local
        self.by_flavor: dict[str, Executor] = {}
        self.router = FlavorRouter(local)
        self.service = SchedulerService(
            store=store,
            executor=self.router,
            job_env=JobEnvironment(mlflow_tracking_uri="http://mlflow.test", base={}),
            check_config=self.check,
            on_config=self.use,
        )
        self.jobs_dir = jobs_dir
        self.overrides: dict[str, Executor] = {}

    def check(self, config: QueueConfig) -> None:
        for flavor in config.flavors.values():
            build_executor(flavor, local=self.local, jobs_dir=self.jobs_dir)

    def use(self, config: QueueConfig) -> None:
        self.by_flavor = {
            f.name: self.overrides.get(f.name)
            or build_executor(f, local=self.local, jobs_dir=self.jobs_dir)
            for f in config.flavors.values()
        }
        self.router.update(self.by_flavor)


@pytest_asyncio.fixture(loop_scope="session")
async def wired(tmp_path: Path) -> AsyncIterator[tuple[Wired, Database]]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}")
    await db.migrate(MIGRATIONS)
    store = SqlJobStore(
        db, events=OutboxJobEvents(Outbox(outbox_table, source="/plinth/scheduler"))
    )
    made = Wired(store, tmp_path / "jobs", FakeExecutor(capacity=Resources(cpu=8)))
    yield made, db
    await made.service.stop()
    await made.router.aclose()
    await db.close()


def spec(team: str, name: str = "train", **fields: object) -> JobSpec:
    return JobSpec(
        name=name,
        team=team,
        entrypoint=("python", "train.py"),
        resources=Resources(cpu=1),
        **fields,  # type: ignore[arg-type]
    )


async def outbox_text(db: Database) -> str:
    async with db.read() as session:
        rows = await session.execute(sa.select(outbox_table))
    return "\n".join(str(tuple(row)) for row in rows)


@ASYNC
async def test_an_unreachable_engine_keeps_its_jobs_queued_with_the_reason_and_others_run(
    wired: tuple[Wired, Database], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made, db = wired
    service = made.service
    token_file = tmp_path / "ray-token"
    token_file.write_text(TOKEN + "\n")
    caplog.set_level(logging.INFO, logger="services")
    async with HangUp() as ray:
        await service.apply_queue_config(ADMIN, queues(ray.port, token_file))
        held = await service.submit(
            ADMIN, spec("vision", retry=RetryPolicy(infrastructure_failure_limit=3))
        )
        local = await service.submit(ADMIN, spec("ml"))
        for _ in range(10):  # ten passes in a row: the engine is asked once, then backed off
            await service.dispatch_once()
        seen = ray.connections

    assert made.local.launched == [local.id]  # the other flavor is served as usual
    job = await service.get(ADMIN, held.id)
    assert job.state is JobState.QUEUED
    assert job.attempt == 1 and job.infrastructure_failures == 0  # not a retried failure
    assert job.pending is not None
    assert job.pending.reason.startswith("executor ray unreachable: "), job.pending.reason
    assert 1 <= seen <= 2, f"the down engine was asked {seen} times in ten passes"
    assert TOKEN not in caplog.text
    assert TOKEN not in await outbox_text(db)
    assert "executor ray unreachable" in caplog.text  # the operator is told, once per try


@ASYNC
async def test_an_engine_that_refuses_a_job_fails_it_at_once_with_its_message(
    wired: tuple[Wired, Database], tmp_path: Path
) -> None:
    made, _ = wired
    service = made.service
    refusing = RefusingExecutor()
    made.overrides["slurm"] = refusing
    token_file = tmp_path / "ray-token"
    token_file.write_text(TOKEN)
    await service.apply_queue_config(ADMIN, queues(1, token_file))
    job = await service.submit(
        ADMIN,
        spec("research", retry=RetryPolicy(user_failure_limit=3, infrastructure_failure_limit=3)),
    )
    await service.dispatch_once()
    await service.wait_idle()
    for _ in range(3):
        await service.dispatch_once()

    done = await service.get(ADMIN, job.id)
    assert done.state is JobState.FAILED
    assert "invalid partition specified: nope" in done.failure_reason
    assert refusing.attempts == [(job.id, 1)]  # not retried


@ASYNC
async def test_a_preemption_reported_by_the_engine_requeues_the_job_without_burning_budget(
    wired: tuple[Wired, Database], tmp_path: Path
) -> None:
    made, _ = wired
    service = made.service
    engine = FakeExecutor()
    made.overrides["slurm"] = engine
    token_file = tmp_path / "ray-token"
    token_file.write_text(TOKEN)
    await service.apply_queue_config(ADMIN, queues(1, token_file))
    job = await service.submit(ADMIN, spec("research"))  # no retries at all
    await service.dispatch_once()
    engine.handles[job.id].exit(ExitStatus(exit_code=-1, signal=15, end_reason=EndReason.PREEMPTED))
    await service.wait_idle()

    requeued = await service.get(ADMIN, job.id)
    assert requeued.state is JobState.QUEUED and requeued.attempt == 2
    assert (requeued.user_failures, requeued.infrastructure_failures) == (0, 0)
    await service.dispatch_once()
    assert engine.attempts == [(job.id, 1), (job.id, 2)]


def test_judge_requeues_an_engine_preemption_but_a_cancel_still_wins() -> None:
    job = Job(
        id="j-1",
        spec=spec("research"),
        state=JobState.RUNNING,
        created_at=datetime.now(UTC),
    )
    preempted = ExitStatus(exit_code=-1, signal=15, end_reason=EndReason.PREEMPTED)
    verdict = judge(job, preempted)
    assert verdict.outcome is Outcome.REQUEUED and verdict.end_reason is EndReason.PREEMPTED
    assert verdict.failure_kind is None
    assert "preempted by its executor" in verdict.message
    cancelled = judge(job.request_cancel(), preempted)
    assert cancelled.outcome is Outcome.CANCELLED
    evicted = judge(job, ExitStatus(exit_code=-1, end_reason=EndReason.EVICTED))
    assert evicted.outcome is Outcome.RETRYING  # an eviction is a failure, retried
    assert evicted.failure_kind is FailureKind.INFRASTRUCTURE


def test_a_flavor_whose_executor_cannot_be_built_is_refused_naming_the_field(
    tmp_path: Path,
) -> None:
    local = FakeExecutor()
    bad = ResourceFlavor(name="gpu", executor="ray", executor_options={"address": "ray:8265"})
    with pytest.raises(InvalidArgument) as caught:
        build_executor(bad, local=local, jobs_dir=tmp_path)
    assert caught.value.field == "flavors.gpu.executor_options.address"
    unknown = ResourceFlavor(name="gpu", executor="nomad")
    with pytest.raises(InvalidArgument) as caught:
        build_executor(unknown, local=local, jobs_dir=tmp_path)
    assert caught.value.field == "flavors.gpu.executor"
    assert "kubernetes" in caught.value.problem


def test_pending_reasons_fold_into_a_small_fixed_set_of_classes() -> None:
    cases = {
        "executor ray unreachable: Cannot connect to host 127.0.0.1:1": "executor",
        "retrying after backoff, not before 2026-12-02T03:00:00Z": "backoff",
        "waiting for 2 cpu in flavor cpu: queue ml uses 2 of its 2; first in its queue": "quota",
        "waiting for 2 cpu in flavor cpu: queue ml uses 4 of its 2, the cohort has 0 to lend": (
            "cohort"
        ),
        "waiting for 1 preempted job to stop": "priority",
        "fits now, but waits behind job j-1 so as not to delay its start": "priority",
        "fits now: admitted at the next admission cycle": "ready",
        "its queue 'gone' is not in the configuration": "other",
    }
    for sentence, expected in cases.items():
        assert pending_reason_class(sentence) == expected, sentence
        assert expected in PENDING_REASONS
