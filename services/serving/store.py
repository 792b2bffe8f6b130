"""The serving store: deployments, plus the outbox and processed-events tables."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from plinth_common.errors import InvalidArgument
from plinth_common.events import event_tables

metadata = sa.MetaData()
outbox_table, processed_table = event_tables(metadata)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("team", sa.String(63), nullable=False, index=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("max_batch_size", sa.Integer, nullable=False),
    sa.Column("max_queue_delay_us", sa.Integer, nullable=False),
    sa.Column("instance_count", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    # The version that answers, and its tensor mapping (signature.ModelIO as JSON).
    sa.Column("serving_version", sa.String(32), nullable=False, server_default=""),
    sa.Column("serving_io", sa.Text, nullable=False, server_default=""),
    sa.Column("loading_version", sa.String(32), nullable=False, server_default=""),
    # What the alias points to, as last heard (a promotion, or the registry at creation).
    sa.Column("target_version", sa.String(32), nullable=False, server_default=""),
    sa.Column("target_source", sa.Text, nullable=False, server_default=""),
    sa.Column("target_run_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("target_time", sa.DateTime(timezone=True)),
    sa.Column("target_traceparent", sa.String(64), nullable=False, server_default=""),
    # A target that failed is not retried until a promotion names a version again.
    sa.Column("failed_version", sa.String(32), nullable=False, server_default=""),
    sa.Column("last_error", sa.Text, nullable=False, server_default=""),
    # The registry has not yet been asked (or could not answer) where the alias points.
    sa.Column("lookup_pending", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_deployments_model_alias", "model_name", "alias"),
)


@dataclass(frozen=True, kw_only=True)
class DeploymentRow:
    """A deployment as stored."""

    seq: int
    name: str
    team: str
    model_name: str
    alias: str
    max_batch_size: int
    max_queue_delay_us: int
    instance_count: int
    state: str
    serving_version: str
    serving_io: str
    loading_version: str
    target_version: str
    target_source: str
    target_run_id: str
    target_time: datetime | None
    target_traceparent: str
    failed_version: str
    last_error: str
    lookup_pending: bool
    created_at: datetime
    updated_at: datetime


def _row(mapping: Any) -> DeploymentRow:
    return DeploymentRow(**dict(mapping))


def encode_page_token(seq: int) -> str:
    """An opaque token for "deployments older than ``seq``"."""
    return base64.urlsafe_b64encode(f"deployments:{seq}".encode()).decode()


def decode_page_token(token: str) -> int:
    """Reverses :func:`encode_page_token`; a bad token is an invalid argument."""
    try:
        kind, seq = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if kind != "deployments":
            raise ValueError(kind)
        return int(seq)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "not a token this server issued") from None


class DeploymentStore:
    """Queries on the deployments table; every method runs in the caller's session."""

    async def insert(self, session: AsyncSession, **values: Any) -> DeploymentRow:
        """Inserts a deployment and returns it as stored."""
        result = await session.execute(
            sa.insert(deployments).values(**values).returning(*deployments.c)
        )
        return _row(result.mappings().one())

    async def get(self, session: AsyncSession, name: str) -> DeploymentRow | None:
        """The deployment called ``name``, or None."""
        result = await session.execute(sa.select(deployments).where(deployments.c.name == name))
        mapping = result.mappings().one_or_none()
        return _row(mapping) if mapping else None

    async def update(self, session: AsyncSession, name: str, **values: Any) -> DeploymentRow | None:
        """Updates a deployment; returns the new row, or None when it does not exist."""
        statement = (
            sa.update(deployments)
            .where(deployments.c.name == name)
            .values(**values)
            .returning(*deployments.c)
        )
        mapping = (await session.execute(statement)).mappings().one_or_none()
        return _row(mapping) if mapping else None

    async def delete(self, session: AsyncSession, name: str) -> DeploymentRow | None:
        """Deletes a deployment; returns it as it was, or None."""
        statement = (
            sa.delete(deployments).where(deployments.c.name == name).returning(*deployments.c)
        )
        mapping = (await session.execute(statement)).mappings().one_or_none()
        return _row(mapping) if mapping else None

    async def page(
        self, session: AsyncSession, *, team: str, limit: int, before_seq: int | None
    ) -> list[DeploymentRow]:
        """Deployments newest first, of one team ('' means any)."""
        statement = sa.select(deployments).order_by(deployments.c.seq.desc()).limit(limit)
        if team:
            statement = statement.where(deployments.c.team == team)
        if before_seq is not None:
            statement = statement.where(deployments.c.seq < before_seq)
        return [_row(m) for m in (await session.execute(statement)).mappings()]

    async def following(
        self, session: AsyncSession, model_name: str, alias: str
    ) -> list[DeploymentRow]:
        """Deployments that follow ``alias`` of ``model_name``."""
        statement = (
            sa.select(deployments)
            .where(deployments.c.model_name == model_name, deployments.c.alias == alias)
            .order_by(deployments.c.seq)
        )
        return [_row(m) for m in (await session.execute(statement)).mappings()]

    async def needing_work(self, session: AsyncSession) -> list[DeploymentRow]:
        """Deployments whose target is neither served nor failed, or whose alias is unresolved."""
        c = deployments.c
        statement = sa.select(deployments).where(
            sa.or_(
                sa.and_(
                    c.target_version != "",
                    c.target_version != c.serving_version,
                    c.target_version != c.failed_version,
                ),
                c.lookup_pending.is_(True),
                c.loading_version != "",
            )
        )
        return [_row(m) for m in (await session.execute(statement)).mappings()]

    async def serving(self, session: AsyncSession) -> list[DeploymentRow]:
        """Deployments that have a serving version."""
        statement = (
            sa.select(deployments)
            .where(deployments.c.serving_version != "")
            .order_by(deployments.c.seq)
        )
        return [_row(m) for m in (await session.execute(statement)).mappings()]

    async def names(self, session: AsyncSession) -> set[str]:
        """Names of every deployment."""
        return set((await session.execute(sa.select(deployments.c.name))).scalars())
