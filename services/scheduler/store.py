"""The scheduler's store: jobs, plus the outbox and processed-events tables.

The only scheduler module that speaks SQL. It turns rows into :mod:`services.scheduler.domain`
types and back, and hands the service a unit of work (:class:`SqlJobTransaction`) in which job
changes and their events (the outbox) commit together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession

from plinth_common.db import Database
from plinth_common.events import event_tables
from services.scheduler.domain import Job, JobEvent, JobSpec, JobState, Resources

metadata = sa.MetaData()
outbox_table, processed_table = event_tables(metadata)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("team", sa.String(63), nullable=False, index=True),
    sa.Column("entrypoint", sa.JSON, nullable=False),
    sa.Column("working_dir", sa.String(4096), nullable=False),
    sa.Column("env", sa.JSON, nullable=False),
    sa.Column("cpu", sa.Float, nullable=False),
    sa.Column("memory_bytes", sa.BigInteger, nullable=False),
    sa.Column("gpu", sa.Integer, nullable=False),
    sa.Column("register_as", sa.String(128), nullable=False, server_default=""),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("admitted_at", sa.DateTime(timezone=True)),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("exit_code", sa.Integer),
    sa.Column("signal", sa.Integer),
    sa.Column("failure_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("mlflow_run_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("outputs", sa.JSON, nullable=False),
    sa.Column("pid", sa.Integer),
    sa.Column("traceparent", sa.String(64), nullable=False, server_default=""),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
)


# Columns a transition may change; the rest is fixed at submission.
_MUTABLE = (
    "state",
    "admitted_at",
    "started_at",
    "finished_at",
    "exit_code",
    "signal",
    "failure_reason",
    "mlflow_run_id",
    "outputs",
    "pid",
    "cancel_requested",
)


def job_from_row(row: RowMapping) -> Job:
    """A ``jobs`` row -> domain job."""
    return Job(
        id=row["id"],
        seq=row["seq"],
        spec=JobSpec(
            name=row["name"],
            team=row["team"],
            entrypoint=tuple(row["entrypoint"]),
            working_dir=row["working_dir"],
            env=dict(row["env"]),
            resources=Resources(cpu=row["cpu"], memory_bytes=row["memory_bytes"], gpu=row["gpu"]),
            register_as=row["register_as"],
        ),
        state=JobState(row["state"]),
        created_at=row["created_at"],
        admitted_at=row["admitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        exit_code=row["exit_code"],
        signal=row["signal"],
        failure_reason=row["failure_reason"],
        mlflow_run_id=row["mlflow_run_id"],
        outputs=dict(row["outputs"]),
        pid=row["pid"],
        traceparent=row["traceparent"],
        cancel_requested=row["cancel_requested"],
    )


def row_from_job(job: Job) -> dict[str, Any]:
    """Domain job -> ``jobs`` column values (without ``seq``, which the database assigns)."""
    return {
        "id": job.id,
        "name": job.spec.name,
        "team": job.spec.team,
        "entrypoint": list(job.spec.entrypoint),
        "working_dir": job.spec.working_dir,
        "env": dict(job.spec.env),
        "cpu": job.spec.resources.cpu,
        "memory_bytes": job.spec.resources.memory_bytes,
        "gpu": job.spec.resources.gpu,
        "register_as": job.spec.register_as,
        "state": job.state.value,
        "created_at": job.created_at,
        "admitted_at": job.admitted_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "exit_code": job.exit_code,
        "signal": job.signal,
        "failure_reason": job.failure_reason,
        "mlflow_run_id": job.mlflow_run_id,
        "outputs": dict(job.outputs),
        "pid": job.pid,
        "traceparent": job.traceparent,
        "cancel_requested": job.cancel_requested,
    }


class EventWriter(Protocol):
    """Writes a job event into the session's transaction (the outbox)."""

    async def write(self, session: AsyncSession, event: JobEvent) -> None: ...


class SqlJobTransaction:
    """One write transaction: reads, compare-and-set updates and events commit together."""

    def __init__(self, session: AsyncSession, events: EventWriter) -> None:
        self._session = session
        self._events = events

    async def get(self, job_id: str) -> Job | None:
        """The job, locked until commit where the database can (PostgreSQL); None if unknown."""
        statement = sa.select(jobs).where(jobs.c.id == job_id).with_for_update()
        row = (await self._session.execute(statement)).mappings().one_or_none()
        return job_from_row(row) if row else None

    async def add(self, job: Job) -> Job:
        """Inserts a new job and returns it as stored (with its ``seq``)."""
        statement = sa.insert(jobs).values(**row_from_job(job)).returning(*jobs.c)
        return job_from_row((await self._session.execute(statement)).mappings().one())

    async def replace(self, job: Job, *, expect: JobState) -> Job | None:
        """Stores ``job``'s changes if the stored job is still in state ``expect``.

        Returns the stored job, or None when another change got there first.
        """
        values = {name: value for name, value in row_from_job(job).items() if name in _MUTABLE}
        statement = (
            sa.update(jobs)
            .where(jobs.c.id == job.id, jobs.c.state == expect.value)
            .values(**values)
            .returning(*jobs.c)
        )
        row = (await self._session.execute(statement)).mappings().one_or_none()
        return job_from_row(row) if row else None

    async def emit(self, event: JobEvent) -> None:
        """Records ``event``; it is published once this transaction commits."""
        await self._events.write(self._session, event)


class SqlJobStore:
    """The scheduler's jobs in SQL (SQLite or PostgreSQL).

    Args:
        db: the scheduler's database.
        events: writes job events into the outbox of the same transaction.
    """

    def __init__(self, db: Database, *, events: EventWriter) -> None:
        self._db = db
        self._events = events

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlJobTransaction]:
        """A unit of work: committed when the block ends, rolled back if it raises."""
        async with self._db.transaction() as session:
            yield SqlJobTransaction(session, self._events)

    async def get(self, job_id: str) -> Job | None:
        """The job with that id, or None."""
        async with self._db.read() as session:
            result = await session.execute(sa.select(jobs).where(jobs.c.id == job_id))
            row = result.mappings().one_or_none()
        return job_from_row(row) if row else None

    async def page(
        self,
        *,
        teams: Collection[str] | None,
        state: JobState | None,
        limit: int,
        before_seq: int | None,
    ) -> list[Job]:
        """Up to ``limit`` jobs newest first, of ``teams`` (None means any) in ``state``."""
        statement = sa.select(jobs).order_by(jobs.c.seq.desc()).limit(limit)
        if teams is not None:
            statement = statement.where(jobs.c.team.in_(sorted(teams)))
        if state is not None:
            statement = statement.where(jobs.c.state == state.value)
        if before_seq is not None:
            statement = statement.where(jobs.c.seq < before_seq)
        async with self._db.read() as session:
            rows = (await session.execute(statement)).mappings().all()
        return [job_from_row(row) for row in rows]

    async def in_states(self, states: Sequence[JobState]) -> list[Job]:
        """Jobs in any of ``states``, oldest first (queue order)."""
        statement = (
            sa.select(jobs).where(jobs.c.state.in_([s.value for s in states])).order_by(jobs.c.seq)
        )
        async with self._db.read() as session:
            rows = (await session.execute(statement)).mappings().all()
        return [job_from_row(row) for row in rows]
