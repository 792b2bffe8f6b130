"""The scheduler service on a real SQLite store (a temp file) with a fake executor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest
import pytest_asyncio
import sqlalchemy as sa

from plinth_common.db import Database
from plinth_common.events import Outbox
from services.scheduler.app import MIGRATIONS
from services.scheduler.credentials import TeamCredentialsSource
from services.scheduler.events import OutboxJobEvents
from services.scheduler.service import JobEnvironment, JobStore, SchedulerService
from services.scheduler.store import SqlJobStore, outbox_table
from tests.unit.scheduler.fakes import FakeExecutor


class MakeService(Protocol):
    def __call__(
        self,
        executor: FakeExecutor,
        *,
        store: JobStore | None = None,
        credentials: TeamCredentialsSource | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> SchedulerService: ...


class Clock:
    """A clock the test moves: ``clock.advance(61)``."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest_asyncio.fixture(loop_scope="session")
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}")
    await database.migrate(MIGRATIONS)
    yield database
    await database.close()


@pytest.fixture
def store(db: Database) -> SqlJobStore:
    return SqlJobStore(db, events=OutboxJobEvents(Outbox(outbox_table, source="/plinth/scheduler")))


@pytest.fixture
def executor() -> FakeExecutor:
    return FakeExecutor()


@pytest_asyncio.fixture(loop_scope="session")
async def make_service(store: SqlJobStore) -> AsyncIterator[MakeService]:
    default_store = store
    """Builds services on the one store (a second one plays the restarted scheduler)."""
    made: list[SchedulerService] = []

    def make(
        executor: FakeExecutor,
        *,
        store: JobStore | None = None,
        credentials: TeamCredentialsSource | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> SchedulerService:
        service = SchedulerService(
            store=store or default_store,
            executor=executor,
            job_env=JobEnvironment(
                mlflow_tracking_uri="http://mlflow.test",
                # The scheduler's own MLflow login must never reach a job.
                base={"PATH": "/usr/bin", "MLFLOW_TRACKING_PASSWORD": "the-scheduler's-own"},
            ),
            credentials=credentials,
            finish_attempts=2,
            preemption_grace_s=7.0,
            clock=clock or (lambda: datetime.now(UTC)),
        )
        made.append(service)
        return service

    yield make
    for service in made:
        await service.stop()


@pytest.fixture
def service(make_service: MakeService, executor: FakeExecutor) -> SchedulerService:
    """A service whose dispatcher is not running: tests call ``dispatch_once`` themselves."""
    return make_service(executor)


async def event_types(db: Database, job_id: str) -> list[str]:
    """The types of the events the outbox holds for ``job_id``, in the order they were written."""
    async with db.read() as session:
        rows = await session.execute(sa.select(outbox_table.c.headers).order_by(outbox_table.c.seq))
    return [h["ce-type"] for (h,) in rows if h["ce-subject"] == job_id]
