"""API keys exchanged for an OIDC token keep the team roles its claim named.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # JSON object team -> role number; empty for every key made with CreateApiKey.
    op.add_column(
        "api_keys", sa.Column("claim_teams", sa.Text, nullable=False, server_default="{}")
    )


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("claim_teams")
