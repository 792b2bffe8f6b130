"""Outbox and processed events.

Revision ID: 0001
Revises:
"""

from alembic import op

from plinth_common.events import create_event_tables

revision = "0001"
down_revision = None


def upgrade() -> None:
    create_event_tables(op)


def downgrade() -> None:
    op.drop_table("event_outbox")
    op.drop_table("processed_events")
