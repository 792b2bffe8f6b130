"""Traffic splits (canaries and a requested split), the SLO canaries are judged by, and the
data plane's admission limits.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"

_COLUMNS = (
    ("slo_error_rate_pct", sa.Float, "1"),
    ("slo_p99_ms", sa.Float, "500"),
    ("slo_window_s", sa.Integer, "60"),
    ("max_concurrency", sa.Integer, "0"),
    ("max_queue", sa.Integer, "0"),
    ("canaries", sa.Text, ""),
    ("pending_traffic", sa.Text, ""),
)


def upgrade() -> None:
    # Existing deployments get the default SLO, no limits, and serve their version alone.
    for name, kind, default in _COLUMNS:
        op.add_column("deployments", sa.Column(name, kind, nullable=False, server_default=default))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for name, _kind, _default in reversed(_COLUMNS):
            batch.drop_column(name)
