"""Queues, priorities, attempts and retries: job columns, ``job_attempts``, ``queue_configs``.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

_JOB_COLUMNS = (
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
)


def upgrade() -> None:
    for column in _JOB_COLUMNS:
        op.add_column("jobs", column)
    # The history of a team's jobs of one name (expected run times).
    op.create_index("ix_jobs_team_name_state", "jobs", ["team", "name", "state"])
    op.create_table(
        "job_attempts",
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
    op.create_table(
        "queue_configs",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("applied_by", sa.String(256), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("queue_configs")
    op.drop_table("job_attempts")
    op.drop_index("ix_jobs_team_name_state", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in _JOB_COLUMNS:
            batch.drop_column(column.name)
