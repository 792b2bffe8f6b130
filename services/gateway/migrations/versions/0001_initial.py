"""Teams, identities, memberships, API keys, audit records, outbox and processed events.

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
        "teams",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
    )
    op.create_table(
        "identities",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "memberships",
        sa.Column(
            "team",
            sa.String(63),
            sa.ForeignKey("teams.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("user", sa.String(128), primary_key=True),
        sa.Column("role", sa.Integer, nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("added_by", sa.String(128), nullable=False),
    )
    op.create_index("ix_memberships_user", "memberships", ["user"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(128), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_api_keys_owner", "api_keys", ["owner"])
    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("principal", sa.String(128), nullable=False),
        sa.Column("principal_kind", sa.String(32), nullable=False),
        sa.Column("method", sa.String(255), nullable=False),
        sa.Column("permission", sa.String(64), nullable=False),
        sa.Column("team", sa.String(63), nullable=False),
        sa.Column("resource", sa.String(255), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=False),
    )
    op.create_index("ix_audit_records_time", "audit_records", ["time"])
    op.create_index("ix_audit_records_principal", "audit_records", ["principal"])
    op.create_index("ix_audit_records_team", "audit_records", ["team"])
    create_event_tables(op)


def downgrade() -> None:
    for table in (
        "audit_records",
        "api_keys",
        "memberships",
        "identities",
        "teams",
        "event_outbox",
        "processed_events",
    ):
        op.drop_table(table)
