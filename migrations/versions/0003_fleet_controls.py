"""fleet controls: waves, percent, pause

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 05:05:00

Plain ADD/DROP COLUMN rather than batch mode: on SQLite a batch rebuilds the
table, which the rollout_progress view (it reads `rollouts`) does not allow.
Existing rollouts get the defaults of a plain Blynk-style rollout.
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_ROLLOUT_COLUMNS = [
    sa.Column("push_online", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("percent", sa.Integer(), nullable=False, server_default="100"),
    sa.Column("waves", sa.String(length=64), nullable=True),
    sa.Column("success_percent", sa.Integer(), nullable=True),
    sa.Column("cohort_seed", sa.String(length=16), nullable=False, server_default=""),
    sa.Column("pause_reason", sa.String(length=255), nullable=True),
    sa.Column("resumed_at", sa.DateTime(), nullable=True),
]
_DEVICE_COLUMNS = [
    sa.Column("cohort_bucket", sa.Integer(), nullable=True),
    sa.Column("wave", sa.Integer(), nullable=True),
]


def upgrade() -> None:
    for column in _ROLLOUT_COLUMNS:
        op.add_column("rollouts", column)
    for column in _DEVICE_COLUMNS:
        op.add_column("rollout_devices", column)


def downgrade() -> None:
    for column in reversed(_DEVICE_COLUMNS):
        op.drop_column("rollout_devices", column.name)
    for column in reversed(_ROLLOUT_COLUMNS):
        op.drop_column("rollouts", column.name)
