"""Each feature view's newest data time, for the freshness metric across restarts.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "feature_freshness",
        sa.Column("feature_view", sa.String(128), primary_key=True),
        sa.Column("data_until", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("feature_freshness")
