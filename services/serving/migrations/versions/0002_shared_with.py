"""Deployments shared with other teams for inference.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    # Comma-separated team names; existing deployments are shared with no one.
    op.add_column(
        "deployments", sa.Column("shared_with", sa.Text, nullable=False, server_default="")
    )


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("shared_with")
