"""The scheduler's store: jobs, plus the outbox and processed-events tables."""

from __future__ import annotations

import base64
import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from plinth_common.errors import InvalidArgument
from plinth_common.events import event_tables

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


@dataclass(frozen=True, kw_only=True)
class JobRow:
    """A job as stored."""

    seq: int
    id: str
    name: str
    team: str
    entrypoint: list[str]
    working_dir: str
    env: dict[str, str]
    cpu: float
    memory_bytes: int
    gpu: int
    register_as: str
    state: str
    created_at: datetime
    admitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    signal: int | None
    failure_reason: str
    mlflow_run_id: str
    outputs: dict[str, str]
    pid: int | None
    traceparent: str
    cancel_requested: bool


def _row(mapping: Any) -> JobRow:
    return JobRow(**dict(mapping))


def encode_page_token(seq: int) -> str:
    """An opaque token for "jobs older than ``seq``"."""
    return base64.urlsafe_b64encode(f"jobs:{seq}".encode()).decode()


def decode_page_token(token: str) -> int:
    """Reverses :func:`encode_page_token`; a bad token is an invalid argument."""
    try:
        kind, seq = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if kind != "jobs":
            raise ValueError(kind)
        return int(seq)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "not a token this server issued") from None


class JobStore:
    """Queries on the jobs table; every method runs in the caller's session."""

    async def insert(self, session: AsyncSession, **values: Any) -> JobRow:
        """Inserts a job and returns it as stored."""
        result = await session.execute(sa.insert(jobs).values(**values).returning(*jobs.c))
        return _row(result.mappings().one())

    async def get(self, session: AsyncSession, job_id: str) -> JobRow | None:
        """The job with that id, or None."""
        result = await session.execute(sa.select(jobs).where(jobs.c.id == job_id))
        mapping = result.mappings().one_or_none()
        return _row(mapping) if mapping else None

    async def update(
        self,
        session: AsyncSession,
        job_id: str,
        *,
        expect_states: Sequence[str] | None = None,
        **values: Any,
    ) -> JobRow | None:
        """Updates a job, only if it is in one of ``expect_states``; returns the new row or None."""
        statement = sa.update(jobs).where(jobs.c.id == job_id)
        if expect_states is not None:
            statement = statement.where(jobs.c.state.in_(list(expect_states)))
        result = await session.execute(statement.values(**values).returning(*jobs.c))
        mapping = result.mappings().one_or_none()
        return _row(mapping) if mapping else None

    async def list(
        self, session: AsyncSession, *, team: str, state: str, limit: int, before_seq: int | None
    ) -> builtins.list[JobRow]:
        """Jobs newest first, filtered by team and state ('' means any)."""
        statement = sa.select(jobs).order_by(jobs.c.seq.desc()).limit(limit)
        if team:
            statement = statement.where(jobs.c.team == team)
        if state:
            statement = statement.where(jobs.c.state == state)
        if before_seq is not None:
            statement = statement.where(jobs.c.seq < before_seq)
        return [_row(m) for m in (await session.execute(statement)).mappings()]

    async def in_states(
        self, session: AsyncSession, states: Sequence[str]
    ) -> builtins.list[JobRow]:
        """Jobs in any of ``states``, oldest first (queue order)."""
        statement = sa.select(jobs).where(jobs.c.state.in_(list(states))).order_by(jobs.c.seq)
        return [_row(m) for m in (await session.execute(statement)).mappings()]
