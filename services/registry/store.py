"""The registry's own store: the outbox and processed-events tables, the approvals and the
promotion history of model versions, and the MLflow users of teams.

Models, versions, aliases and policies live in MLflow (see ``mlflow_store``). This database
makes the registry's events transactional and its consumer idempotent, and keeps what MLflow
has no place for: who approved and who promoted (four-eyes), and each team's MLflow user.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession

from plinth_common.db import Database
from plinth_common.events import event_tables
from services.registry.domain import Approval, PromotionRecord, TeamCredentials

metadata = sa.MetaData()
outbox_table, processed_table = event_tables(metadata)

approvals_table = sa.Table(
    "model_approvals",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("alias", sa.String(256), nullable=False),
    sa.Column("approved_by", sa.String(256), nullable=False),
    sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("comment", sa.Text, nullable=False, server_default=""),
    sa.Index("ix_model_approvals_version", "model", "version"),
)

promotions_table = sa.Table(
    "model_promotions",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("alias", sa.String(256), nullable=False),
    sa.Column("promoted_by", sa.String(256), nullable=False),
    sa.Column("approved_by", sa.String(256), nullable=False, server_default=""),
    sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("previous_version", sa.String(32), nullable=False, server_default=""),
    sa.Index("ix_model_promotions_version", "model", "version"),
)

# The password is kept so a team's jobs get the same credentials after a registry restart;
# MLflow itself only stores a hash. The database file is the registry's alone.
team_users_table = sa.Table(
    "team_mlflow_users",
    metadata,
    sa.Column("team", sa.String(63), primary_key=True),
    sa.Column("username", sa.String(128), nullable=False, unique=True),
    sa.Column("password", sa.String(256), nullable=False),
    sa.Column("experiment_id", sa.String(32), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _approval(row: RowMapping) -> Approval:
    return Approval(
        alias=row["alias"],
        approved_by=row["approved_by"],
        approved_at=_aware(row["approved_at"]),
        comment=row["comment"],
    )


def _promotion(row: RowMapping) -> PromotionRecord:
    return PromotionRecord(
        alias=row["alias"],
        promoted_by=row["promoted_by"],
        approved_by=row["approved_by"],
        promoted_at=_aware(row["promoted_at"]),
        previous_version=row["previous_version"],
    )


async def add_promotion(
    session: AsyncSession, *, model: str, version: str, record: PromotionRecord
) -> None:
    """Adds a promotion to a version's history, in the caller's transaction (with its event)."""
    await session.execute(
        sa.insert(promotions_table).values(
            model=model,
            version=version,
            alias=record.alias,
            promoted_by=record.promoted_by,
            approved_by=record.approved_by,
            promoted_at=record.promoted_at,
            previous_version=record.previous_version,
        )
    )


class SqlRecords:
    """Approvals, promotion history and team MLflow users in the registry's database.

    Args:
        db: the registry's database (the runtime's).
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    async def add_approval(self, *, model: str, version: str, approval: Approval) -> None:
        """Records an approval of ``model`` version ``version``."""
        async with self._db.transaction() as session:
            await session.execute(
                sa.insert(approvals_table).values(
                    model=model,
                    version=version,
                    alias=approval.alias,
                    approved_by=approval.approved_by,
                    approved_at=approval.approved_at,
                    comment=approval.comment,
                )
            )

    async def approvals(self, model: str, version: str) -> list[Approval]:
        """A version's approvals, oldest first."""
        query = (
            sa.select(approvals_table)
            .where(approvals_table.c.model == model, approvals_table.c.version == version)
            .order_by(approvals_table.c.seq)
        )
        async with self._db.read() as session:
            rows = (await session.execute(query)).mappings().all()
        return [_approval(row) for row in rows]

    async def history(self, model: str, version: str) -> list[PromotionRecord]:
        """The promotions of a version, oldest first."""
        query = (
            sa.select(promotions_table)
            .where(promotions_table.c.model == model, promotions_table.c.version == version)
            .order_by(promotions_table.c.seq)
        )
        async with self._db.read() as session:
            rows = (await session.execute(query)).mappings().all()
        return [_promotion(row) for row in rows]

    async def trails(
        self, model: str, versions: Collection[str]
    ) -> dict[str, tuple[list[Approval], list[PromotionRecord]]]:
        """Approvals and history of several versions of a model (two queries), oldest first."""
        found: dict[str, tuple[list[Approval], list[PromotionRecord]]] = {
            v: ([], []) for v in versions
        }
        if not found:
            return found
        approvals = (
            sa.select(approvals_table)
            .where(approvals_table.c.model == model, approvals_table.c.version.in_(list(found)))
            .order_by(approvals_table.c.seq)
        )
        promotions = (
            sa.select(promotions_table)
            .where(promotions_table.c.model == model, promotions_table.c.version.in_(list(found)))
            .order_by(promotions_table.c.seq)
        )
        async with self._db.read() as session:
            for row in (await session.execute(approvals)).mappings():
                found[row["version"]][0].append(_approval(row))
            for row in (await session.execute(promotions)).mappings():
                found[row["version"]][1].append(_promotion(row))
        return found

    async def team_user(self, team: str) -> TeamCredentials | None:
        """The team's MLflow user, or None before its first request."""
        query = sa.select(team_users_table).where(team_users_table.c.team == team)
        async with self._db.read() as session:
            row = (await session.execute(query)).mappings().first()
        return None if row is None else _credentials(row)

    async def save_team_user(self, credentials: TeamCredentials) -> None:
        """Stores a team's MLflow user (replacing an earlier one of that team)."""
        async with self._db.transaction() as session:
            await session.execute(
                sa.delete(team_users_table).where(team_users_table.c.team == credentials.team)
            )
            await session.execute(
                sa.insert(team_users_table).values(
                    team=credentials.team,
                    username=credentials.username,
                    password=credentials.password,
                    experiment_id=credentials.experiment_id,
                    created_at=datetime.now(UTC),
                )
            )

    async def team_experiments(self) -> dict[str, str]:
        """Experiment id -> team, for every team that has an MLflow user."""
        query = sa.select(team_users_table.c.experiment_id, team_users_table.c.team)
        async with self._db.read() as session:
            rows = (await session.execute(query)).all()
        return {str(row[0]): str(row[1]) for row in rows}


def _credentials(row: RowMapping) -> TeamCredentials:
    return TeamCredentials(
        team=row["team"],
        username=row["username"],
        password=row["password"],
        experiment_id=row["experiment_id"],
    )
