"""Deployments, outbox and processed events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from plinth_common.events import create_event_tables

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("team", sa.String(63), nullable=False, index=True),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("max_batch_size", sa.Integer, nullable=False),
        sa.Column("max_queue_delay_us", sa.Integer, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("serving_version", sa.String(32), nullable=False, server_default=""),
        sa.Column("serving_io", sa.Text, nullable=False, server_default=""),
        sa.Column("loading_version", sa.String(32), nullable=False, server_default=""),
        sa.Column("target_version", sa.String(32), nullable=False, server_default=""),
        sa.Column("target_source", sa.Text, nullable=False, server_default=""),
        sa.Column("target_run_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("target_time", sa.DateTime(timezone=True)),
        sa.Column("target_traceparent", sa.String(64), nullable=False, server_default=""),
        sa.Column("failed_version", sa.String(32), nullable=False, server_default=""),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("lookup_pending", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_deployments_model_alias", "deployments", ["model_name", "alias"])
    create_event_tables(op)


def downgrade() -> None:
    op.drop_table("deployments")
    op.drop_table("event_outbox")
    op.drop_table("processed_events")
