"""Jobs, outbox and processed events.

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
        "jobs",
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
    create_event_tables(op)


def downgrade() -> None:
    op.drop_table("jobs")
    op.drop_table("event_outbox")
    op.drop_table("processed_events")
