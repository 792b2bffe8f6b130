"""The serving store: deployments, plus the outbox and processed-events tables.

Rows never leave this module: every query returns :class:`~services.serving.domain.Deployment`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from plinth_common.errors import AlreadyExists
from plinth_common.events import event_tables
from services.serving.domain import (
    BatchingSettings,
    Canary,
    Deployment,
    DeploymentAccess,
    DeploymentState,
    Limits,
    Slo,
    TrafficRequest,
    VersionRef,
)
from services.serving.signature import ModelIO

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
    # Teams it is shared with for inference, comma-separated (team names hold no commas).
    sa.Column("shared_with", sa.Text, nullable=False, server_default=""),
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
    # The SLO canaries are judged by, and the data plane's admission limits (0: unlimited).
    sa.Column("slo_error_rate_pct", sa.Float, nullable=False, server_default="1"),
    sa.Column("slo_p99_ms", sa.Float, nullable=False, server_default="500"),
    sa.Column("slo_window_s", sa.Integer, nullable=False, server_default="60"),
    sa.Column("max_concurrency", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_queue", sa.Integer, nullable=False, server_default="0"),
    # Versions sharing the traffic with the serving one (JSON list), and a requested split
    # whose versions still load (JSON object; '' when none).
    sa.Column("canaries", sa.Text, nullable=False, server_default=""),
    sa.Column("pending_traffic", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_deployments_model_alias", "model_name", "alias"),
)


def _deployment(row: sa.RowMapping) -> Deployment:
    return Deployment(
        seq=row["seq"],
        name=row["name"],
        team=row["team"],
        model_name=row["model_name"],
        alias=row["alias"],
        batching=BatchingSettings(
            max_batch_size=row["max_batch_size"],
            max_queue_delay_us=row["max_queue_delay_us"],
            instance_count=row["instance_count"],
        ),
        shared_with=_teams(row["shared_with"]),
        state=DeploymentState(row["state"]),
        serving_version=row["serving_version"],
        serving_io=ModelIO.from_json(row["serving_io"]) if row["serving_io"] else None,
        loading_version=row["loading_version"],
        target_version=row["target_version"],
        target_source=row["target_source"],
        target_run_id=row["target_run_id"],
        target_time=row["target_time"],
        target_traceparent=row["target_traceparent"],
        failed_version=row["failed_version"],
        last_error=row["last_error"],
        lookup_pending=row["lookup_pending"],
        slo=Slo(
            max_error_rate_pct=row["slo_error_rate_pct"],
            max_p99_ms=row["slo_p99_ms"],
            window_s=row["slo_window_s"],
        ),
        limits=Limits(max_concurrency=row["max_concurrency"], max_queue=row["max_queue"]),
        canaries=_canaries(row["canaries"]),
        pending_traffic=_request(row["pending_traffic"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _canaries(text: str) -> tuple[Canary, ...]:
    return tuple(
        Canary(
            version=c["version"],
            percent=c["percent"],
            source=c["source"],
            run_id=c.get("run_id", ""),
            io=ModelIO.from_json(c["io"]) if c.get("io") else None,
        )
        for c in (json.loads(text) if text else [])
    )


def _canaries_json(canaries: tuple[Canary, ...]) -> str:
    if not canaries:
        return ""
    return json.dumps(
        [
            {
                "version": c.version,
                "percent": c.percent,
                "source": c.source,
                "run_id": c.run_id,
                "io": c.io.to_json() if c.io is not None else "",
            }
            for c in canaries
        ]
    )


def _request(text: str) -> TrafficRequest | None:
    if not text:
        return None
    data = json.loads(text)
    return TrafficRequest(
        split=tuple((v, p) for v, p in data["split"]),
        refs=tuple(VersionRef(**ref) for ref in data["refs"]),
        reason=data["reason"],
        actor=data["actor"],
    )


def _request_json(request: TrafficRequest | None) -> str:
    if request is None:
        return ""
    return json.dumps(
        {
            "split": [list(share) for share in request.split],
            "refs": [
                {"version": r.version, "source": r.source, "run_id": r.run_id} for r in request.refs
            ],
            "reason": request.reason,
            "actor": request.actor,
        }
    )


def _teams(text: str) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


def _values(d: Deployment) -> dict[str, Any]:
    return {
        "state": d.state.value,
        "serving_version": d.serving_version,
        "serving_io": d.serving_io.to_json() if d.serving_io is not None else "",
        "loading_version": d.loading_version,
        "target_version": d.target_version,
        "target_source": d.target_source,
        "target_run_id": d.target_run_id,
        "target_time": d.target_time,
        "target_traceparent": d.target_traceparent,
        "failed_version": d.failed_version,
        "last_error": d.last_error,
        "lookup_pending": d.lookup_pending,
        "canaries": _canaries_json(d.canaries),
        "pending_traffic": _request_json(d.pending_traffic),
        "updated_at": d.updated_at,
    }


class DeploymentStore:
    """Queries on the deployments table; every method runs in the caller's session."""

    async def insert(self, session: AsyncSession, deployment: Deployment) -> Deployment:
        """Stores a new deployment and returns it with its ``seq``.

        Raises:
            AlreadyExists: the name is taken.
        """
        values = {
            "name": deployment.name,
            "team": deployment.team,
            "model_name": deployment.model_name,
            "alias": deployment.alias,
            "max_batch_size": deployment.batching.max_batch_size,
            "max_queue_delay_us": deployment.batching.max_queue_delay_us,
            "instance_count": deployment.batching.instance_count,
            "shared_with": ",".join(deployment.shared_with),
            "slo_error_rate_pct": deployment.slo.max_error_rate_pct,
            "slo_p99_ms": deployment.slo.max_p99_ms,
            "slo_window_s": deployment.slo.window_s,
            "max_concurrency": deployment.limits.max_concurrency,
            "max_queue": deployment.limits.max_queue,
            "created_at": deployment.created_at,
            **_values(deployment),
        }
        try:
            # A savepoint, so that a lost race on the name leaves the caller's transaction usable.
            async with session.begin_nested():
                result = await session.execute(
                    sa.insert(deployments).values(**values).returning(*deployments.c)
                )
        except IntegrityError:
            raise AlreadyExists("deployment", deployment.name) from None
        return _deployment(result.mappings().one())

    async def get(self, session: AsyncSession, name: str) -> Deployment | None:
        """The deployment called ``name``, or None."""
        result = await session.execute(sa.select(deployments).where(deployments.c.name == name))
        mapping = result.mappings().one_or_none()
        return _deployment(mapping) if mapping else None

    async def save(self, session: AsyncSession, deployment: Deployment) -> Deployment | None:
        """Writes a deployment's mutable fields; returns it as stored, or None when it is gone."""
        statement = (
            sa.update(deployments)
            .where(deployments.c.name == deployment.name)
            .values(**_values(deployment))
            .returning(*deployments.c)
        )
        mapping = (await session.execute(statement)).mappings().one_or_none()
        return _deployment(mapping) if mapping else None

    async def share(
        self, session: AsyncSession, name: str, teams: Sequence[str], at: datetime
    ) -> Deployment | None:
        """Replaces the teams a deployment is shared with; returns it, or None when it is gone.

        Only this column (and ``updated_at``) is written, so a share never undoes a rollout's
        write, nor a rollout a share (:meth:`save` leaves ``shared_with`` alone).
        """
        statement = (
            sa.update(deployments)
            .where(deployments.c.name == name)
            .values(shared_with=",".join(teams), updated_at=at)
            .returning(*deployments.c)
        )
        mapping = (await session.execute(statement)).mappings().one_or_none()
        return _deployment(mapping) if mapping else None

    async def access(self, session: AsyncSession) -> dict[str, DeploymentAccess]:
        """Every deployment's owning team and shares: deployment name -> who may infer."""
        c = deployments.c
        rows = await session.execute(sa.select(c.name, c.team, c.shared_with))
        return {
            name: DeploymentAccess(team=team, shared_with=frozenset(_teams(shared)))
            for name, team, shared in rows
        }

    async def delete(self, session: AsyncSession, name: str) -> Deployment | None:
        """Deletes a deployment; returns it as it was, or None."""
        statement = (
            sa.delete(deployments).where(deployments.c.name == name).returning(*deployments.c)
        )
        mapping = (await session.execute(statement)).mappings().one_or_none()
        return _deployment(mapping) if mapping else None

    async def page(
        self,
        session: AsyncSession,
        *,
        teams: Collection[str] | None,
        limit: int,
        before_seq: int | None,
    ) -> list[Deployment]:
        """Deployments newest first, of the given teams (None means every team)."""
        statement = sa.select(deployments).order_by(deployments.c.seq.desc()).limit(limit)
        if teams is not None:
            statement = statement.where(deployments.c.team.in_(sorted(teams)))
        if before_seq is not None:
            statement = statement.where(deployments.c.seq < before_seq)
        return await self._all(session, statement)

    async def following(
        self, session: AsyncSession, model_name: str, alias: str
    ) -> list[Deployment]:
        """Deployments that follow ``alias`` of ``model_name``."""
        statement = (
            sa.select(deployments)
            .where(deployments.c.model_name == model_name, deployments.c.alias == alias)
            .order_by(deployments.c.seq)
        )
        return await self._all(session, statement)

    async def needing_work(self, session: AsyncSession) -> list[Deployment]:
        """Deployments whose target is neither served nor failed, whose alias is unresolved,
        that a load in progress left marked, or with a requested split still to apply."""
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
                c.pending_traffic != "",
            )
        )
        return await self._all(session, statement)

    async def serving(self, session: AsyncSession) -> list[Deployment]:
        """Deployments that have a serving version."""
        statement = (
            sa.select(deployments)
            .where(deployments.c.serving_version != "")
            .order_by(deployments.c.seq)
        )
        return await self._all(session, statement)

    @staticmethod
    async def _all(session: AsyncSession, statement: sa.Select[Any]) -> list[Deployment]:
        return [_deployment(m) for m in (await session.execute(statement)).mappings()]
