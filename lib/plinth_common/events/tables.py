"""The outbox and processed-events tables every service's store carries."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import MetaData, Table


def event_tables(metadata: MetaData) -> tuple[Table, Table]:
    """Declares ``event_outbox`` and ``processed_events`` on ``metadata``."""
    outbox = Table(
        "event_outbox",
        metadata,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("headers", sa.JSON, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Index("ix_event_outbox_unpublished", "published_at", "seq"),
    )
    processed = Table(
        "processed_events",
        metadata,
        sa.Column("consumer", sa.String(128), primary_key=True),
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    )
    return outbox, processed


def create_event_tables(op: Any) -> None:
    """Creates both tables (version 1 of their shape) from an Alembic migration; ``op`` is ``alembic.op``."""
    bind = op.get_bind()
    for table in event_tables(MetaData()):
        table.create(bind)
