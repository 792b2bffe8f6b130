"""The revision of the data plane's key table: one row, bumped with every key or membership
change.

Revision ID: 0002
Revises: 0001
"""

import time

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    table = op.create_table(
        "grant_revision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    # Seeded from the clock, not 1: a poller that outlives a replaced store (a new database)
    # must never find its old revision current by coincidence.
    op.bulk_insert(table, [{"id": 1, "revision": time.time_ns() // 1000}])


def downgrade() -> None:
    op.drop_table("grant_revision")
