"""Approvals and promotion history of model versions; the MLflow users of teams.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "model_approvals",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("alias", sa.String(256), nullable=False),
        sa.Column("approved_by", sa.String(256), nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("comment", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("ix_model_approvals_version", "model_approvals", ["model", "version"])
    op.create_table(
        "model_promotions",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("alias", sa.String(256), nullable=False),
        sa.Column("promoted_by", sa.String(256), nullable=False),
        sa.Column("approved_by", sa.String(256), nullable=False, server_default=""),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("previous_version", sa.String(32), nullable=False, server_default=""),
    )
    op.create_index("ix_model_promotions_version", "model_promotions", ["model", "version"])
    op.create_table(
        "team_mlflow_users",
        sa.Column("team", sa.String(63), primary_key=True),
        sa.Column("username", sa.String(128), nullable=False, unique=True),
        sa.Column("password", sa.String(256), nullable=False),
        sa.Column("experiment_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_team_mlflow_users_experiment_id", "team_mlflow_users", ["experiment_id"])


def downgrade() -> None:
    op.drop_table("team_mlflow_users")
    op.drop_table("model_promotions")
    op.drop_table("model_approvals")
