"""The scheduler's store: jobs, their attempts, the queue configurations, plus the outbox and
processed-events tables.

The only scheduler module that speaks SQL. It turns rows into :mod:`services.scheduler.domain`
types and back, and hands the service a unit of work (:class:`SqlJobTransaction`) in which job
changes and their events (the outbox) commit together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Protocol, overload

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession

from plinth_common.db import Database
from plinth_common.events import event_tables
from services.scheduler.domain import (
    Attempt,
    EndReason,
    Job,
    JobEvent,
    JobSpec,
    JobState,
    Resources,
    RetryPolicy,
    StoredQueueConfig,
)

metadata = sa.MetaData()
# Ids per IN (...) query: well under SQLite's bound-parameter limit.
_ID_BATCH = 500
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
    sa.Column("queue", sa.String(63), nullable=False, server_default=""),
    sa.Column("flavor", sa.String(63), nullable=False, server_default=""),
    sa.Column("priority", sa.String(63), nullable=False, server_default=""),
    sa.Column("priority_value", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.Column("replicas", sa.Integer, nullable=False, server_default="1"),
    sa.Column("max_run_time_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("retry", sa.JSON),
    sa.Column("queue_order", sa.Float, nullable=False, server_default="0"),
    sa.Column("queued_at", sa.DateTime(timezone=True)),
    sa.Column("not_before", sa.DateTime(timezone=True)),
    sa.Column("stop_reason", sa.String(32)),
    sa.Column("stop_message", sa.Text, nullable=False, server_default=""),
    sa.Column("user_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("infrastructure_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_jobs_team_name_state", "team", "name", "state"),
)

# One row per finished attempt; the attempt in progress is the job row's own.
job_attempts = sa.Table(
    "job_attempts",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("flavor", sa.String(63), nullable=False),
    sa.Column("queued_at", sa.DateTime(timezone=True)),
    sa.Column("admitted_at", sa.DateTime(timezone=True)),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("end_reason", sa.String(32), nullable=False),
    sa.Column("exit_code", sa.Integer, nullable=False),
    sa.Column("signal", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("cpu", sa.Float, nullable=False),
    sa.Column("memory_bytes", sa.BigInteger, nullable=False),
    sa.Column("gpu", sa.Integer, nullable=False),
    sa.Column("replicas", sa.Integer, nullable=False),
    sa.Column("peak_memory_bytes", sa.BigInteger, nullable=False),
    sa.Column("cpu_seconds", sa.Float, nullable=False),
)

# Every applied queue configuration; the newest is in force.
queue_configs = sa.Table(
    "queue_configs",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("document", sa.JSON, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("applied_by", sa.String(256), nullable=False),
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
    "queue",
    "flavor",
    "priority",
    "priority_value",
    "attempt",
    "queue_order",
    "queued_at",
    "not_before",
    "stop_reason",
    "stop_message",
    "user_failures",
    "infrastructure_failures",
)


@overload
def _utc(value: datetime) -> datetime: ...
@overload
def _utc(value: datetime | None) -> datetime | None: ...
def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every time the scheduler stores is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _retry_from(value: Mapping[str, Any] | None) -> RetryPolicy:
    return RetryPolicy(**value) if value else RetryPolicy()


def _retry_to(retry: RetryPolicy) -> dict[str, Any] | None:
    return None if retry == RetryPolicy() else dataclasses.asdict(retry)


def job_from_row(row: RowMapping, attempts: tuple[Attempt, ...] = ()) -> Job:
    """A ``jobs`` row (and its finished attempts) -> domain job."""
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
            priority=row["priority"],
            replicas=row["replicas"],
            max_run_time_s=row["max_run_time_s"],
            retry=_retry_from(row["retry"]),
        ),
        state=JobState(row["state"]),
        created_at=_utc(row["created_at"]),
        admitted_at=_utc(row["admitted_at"]),
        started_at=_utc(row["started_at"]),
        finished_at=_utc(row["finished_at"]),
        exit_code=row["exit_code"],
        signal=row["signal"],
        failure_reason=row["failure_reason"],
        mlflow_run_id=row["mlflow_run_id"],
        outputs=dict(row["outputs"]),
        pid=row["pid"],
        traceparent=row["traceparent"],
        cancel_requested=row["cancel_requested"],
        queue=row["queue"],
        flavor=row["flavor"],
        priority=row["priority"],
        priority_value=row["priority_value"],
        attempt=row["attempt"],
        queue_order=row["queue_order"],
        queued_at=_utc(row["queued_at"]),
        not_before=_utc(row["not_before"]),
        stop_reason=EndReason(row["stop_reason"]) if row["stop_reason"] else None,
        stop_message=row["stop_message"],
        user_failures=row["user_failures"],
        infrastructure_failures=row["infrastructure_failures"],
        attempts=attempts,
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
        "queue": job.queue,
        "flavor": job.flavor,
        "priority": job.priority,
        "priority_value": job.priority_value,
        "attempt": job.attempt,
        "replicas": job.spec.replicas,
        "max_run_time_s": job.spec.max_run_time_s,
        "retry": _retry_to(job.spec.retry),
        "queue_order": job.queue_order,
        "queued_at": job.queued_at,
        "not_before": job.not_before,
        "stop_reason": job.stop_reason.value if job.stop_reason else None,
        "stop_message": job.stop_message,
        "user_failures": job.user_failures,
        "infrastructure_failures": job.infrastructure_failures,
    }


def attempt_from_row(row: RowMapping) -> Attempt:
    """A ``job_attempts`` row -> domain attempt."""
    return Attempt(
        number=row["number"],
        flavor=row["flavor"],
        queued_at=_utc(row["queued_at"]),
        admitted_at=_utc(row["admitted_at"]),
        started_at=_utc(row["started_at"]),
        finished_at=_utc(row["finished_at"]),
        end_reason=EndReason(row["end_reason"]),
        exit_code=row["exit_code"],
        signal=row["signal"],
        message=row["message"],
        requested=Resources(cpu=row["cpu"], memory_bytes=row["memory_bytes"], gpu=row["gpu"]),
        replicas=row["replicas"],
        peak_memory_bytes=row["peak_memory_bytes"],
        cpu_seconds=row["cpu_seconds"],
    )


def row_from_attempt(job_id: str, attempt: Attempt) -> dict[str, Any]:
    """A finished attempt -> ``job_attempts`` column values."""
    return {
        "job_id": job_id,
        "number": attempt.number,
        "flavor": attempt.flavor,
        "queued_at": attempt.queued_at,
        "admitted_at": attempt.admitted_at,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
        "end_reason": (attempt.end_reason or EndReason.EXITED).value,
        "exit_code": attempt.exit_code,
        "signal": attempt.signal,
        "message": attempt.message,
        "cpu": attempt.requested.cpu,
        "memory_bytes": attempt.requested.memory_bytes,
        "gpu": attempt.requested.gpu,
        "replicas": attempt.replicas,
        "peak_memory_bytes": attempt.peak_memory_bytes,
        "cpu_seconds": attempt.cpu_seconds,
    }


async def _attempts_of(
    session: AsyncSession, job_ids: Collection[str]
) -> dict[str, tuple[Attempt, ...]]:
    if not job_ids:
        return {}
    statement = (
        sa.select(job_attempts)
        .where(job_attempts.c.job_id.in_(sorted(job_ids)))
        .order_by(job_attempts.c.job_id, job_attempts.c.number)
    )
    found: dict[str, list[Attempt]] = {}
    for row in (await session.execute(statement)).mappings():
        found.setdefault(row["job_id"], []).append(attempt_from_row(row))
    return {job_id: tuple(attempts) for job_id, attempts in found.items()}


async def _with_attempts(session: AsyncSession, rows: Sequence[RowMapping]) -> list[Job]:
    attempts = await _attempts_of(session, [row["id"] for row in rows])
    return [job_from_row(row, attempts.get(row["id"], ())) for row in rows]


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
        return (await _with_attempts(self._session, [row]))[0] if row else None

    async def add(self, job: Job) -> Job:
        """Inserts a new job and returns it as stored (with its ``seq``)."""
        statement = sa.insert(jobs).values(**row_from_job(job)).returning(*jobs.c)
        return job_from_row((await self._session.execute(statement)).mappings().one())

    async def replace(self, job: Job, *, expect: JobState) -> Job | None:
        """Stores ``job``'s changes if the stored job is still in state ``expect``.

        Returns the stored job with its finished attempts (answers such as CancelJob's show
        them), or None when another change got there first.
        """
        values = {name: value for name, value in row_from_job(job).items() if name in _MUTABLE}
        statement = (
            sa.update(jobs)
            .where(jobs.c.id == job.id, jobs.c.state == expect.value)
            .values(**values)
            .returning(*jobs.c)
        )
        row = (await self._session.execute(statement)).mappings().one_or_none()
        return (await _with_attempts(self._session, [row]))[0] if row else None

    async def emit(self, event: JobEvent) -> None:
        """Records ``event``; it is published once this transaction commits."""
        await self._events.write(self._session, event)

    async def add_attempt(self, job_id: str, attempt: Attempt) -> None:
        """Records a finished attempt of the job (once per number: a repeat is ignored)."""
        exists = await self._session.execute(
            sa.select(job_attempts.c.number).where(
                job_attempts.c.job_id == job_id, job_attempts.c.number == attempt.number
            )
        )
        if exists.first() is None:
            await self._session.execute(
                sa.insert(job_attempts).values(**row_from_attempt(job_id, attempt))
            )


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
            return (await _with_attempts(session, [row]))[0] if row else None

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
            return await _with_attempts(session, rows)

    async def in_states(self, states: Sequence[JobState]) -> list[Job]:
        """Jobs in any of ``states``, oldest first, without their finished attempts (the
        dispatcher's view: it needs none)."""
        statement = (
            sa.select(jobs).where(jobs.c.state.in_([s.value for s in states])).order_by(jobs.c.seq)
        )
        async with self._db.read() as session:
            rows = (await session.execute(statement)).mappings().all()
        return [job_from_row(row) for row in rows]

    async def queued_index(self) -> dict[str, int]:
        """The queued jobs' ids and attempt numbers (a queued row changes only by leaving the
        queue, and comes back with the next attempt: the dispatcher caches the rest)."""
        statement = sa.select(jobs.c.id, jobs.c.attempt).where(
            jobs.c.state == JobState.QUEUED.value
        )
        async with self._db.read() as session:
            return dict((await session.execute(statement)).tuples().all())

    async def by_ids(self, job_ids: Collection[str]) -> list[Job]:
        """The jobs with these ids, by submission order (without their finished attempts)."""
        found: list[Job] = []
        ids = sorted(job_ids)
        async with self._db.read() as session:
            for start in range(0, len(ids), _ID_BATCH):
                statement = sa.select(jobs).where(jobs.c.id.in_(ids[start : start + _ID_BATCH]))
                rows = (await session.execute(statement)).mappings().all()
                found.extend(job_from_row(row) for row in rows)
        return sorted(found, key=lambda job: job.seq)

    async def run_seconds(
        self, keys: Collection[tuple[str, str]], *, limit: int
    ) -> dict[tuple[str, str], list[float]]:
        """Run times of each ``(team, name)``'s last ``limit`` succeeded jobs, newest first (one
        query for all: a window over the succeeded jobs of those teams and names)."""
        if not keys:
            return {}
        teams = sorted({team for team, _ in keys})
        names = sorted({name for _, name in keys})
        ranked = (
            sa.select(
                jobs.c.team,
                jobs.c.name,
                jobs.c.started_at,
                jobs.c.finished_at,
                sa.func.row_number()
                .over(partition_by=(jobs.c.team, jobs.c.name), order_by=jobs.c.seq.desc())
                .label("rank"),
            )
            .where(
                jobs.c.state == JobState.SUCCEEDED.value,
                jobs.c.team.in_(teams),
                jobs.c.name.in_(names),
                jobs.c.started_at.is_not(None),
                jobs.c.finished_at.is_not(None),
            )
            .subquery()
        )
        statement = (
            sa.select(ranked.c.team, ranked.c.name, ranked.c.started_at, ranked.c.finished_at)
            .where(ranked.c.rank <= limit)
            .order_by(ranked.c.team, ranked.c.name, ranked.c.rank)
        )
        async with self._db.read() as session:
            rows = (await session.execute(statement)).all()
        wanted = set(keys)
        found: dict[tuple[str, str], list[float]] = {key: [] for key in wanted}
        for team, name, started, finished in rows:
            if (team, name) in wanted:
                found[(team, name)].append(max(0.0, (finished - started).total_seconds()))
        return found

    async def latest_queue_config(self) -> StoredQueueConfig | None:
        """The newest applied queue configuration, or None when none was ever applied."""
        statement = sa.select(queue_configs).order_by(queue_configs.c.version.desc()).limit(1)
        async with self._db.read() as session:
            row = (await session.execute(statement)).mappings().one_or_none()
        if row is None:
            return None
        return StoredQueueConfig(
            version=row["version"],
            document=dict(row["document"]),
            applied_at=_utc(row["applied_at"]) or datetime.now(UTC),
            applied_by=row["applied_by"],
        )

    async def add_queue_config(
        self, document: Mapping[str, Any], *, applied_by: str, applied_at: datetime
    ) -> StoredQueueConfig:
        """Stores a new configuration (it is in force from now on); returns it with its version."""
        async with self._db.transaction() as session:
            result = await session.execute(
                sa.insert(queue_configs)
                .values(document=dict(document), applied_at=applied_at, applied_by=applied_by)
                .returning(queue_configs.c.version)
            )
            version = int(result.scalar_one())
        return StoredQueueConfig(
            version=version, document=dict(document), applied_at=applied_at, applied_by=applied_by
        )
