"""The platform monitor's per-minute SLO and report buckets.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "slo_buckets",
        sa.Column("slo", sa.String(63), primary_key=True),
        sa.Column("scope", sa.String(128), primary_key=True),
        sa.Column("start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("good", sa.BigInteger, nullable=False),
        sa.Column("total", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_slo_buckets_start", "slo_buckets", ["start"])
    op.create_table(
        "monitor_buckets",
        sa.Column("figure", sa.String(63), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
    )
    op.create_index("ix_monitor_buckets_start", "monitor_buckets", ["start"])


def downgrade() -> None:
    op.drop_table("monitor_buckets")
    op.drop_table("slo_buckets")
