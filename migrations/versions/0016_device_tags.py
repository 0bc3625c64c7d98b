"""Device tags, and rollouts aimed at a tag

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 16:00:00

`device_tags` holds each device's tags (groups); `rollouts.tag` narrows a
campaign's scope to the devices carrying it. Existing rollouts have none.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: Union[str, Sequence[str], None] = "0015"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "device_tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(24), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_tags_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_tags")),
        sa.UniqueConstraint("device_id", "tag", name=op.f("uq_device_tags_device_id")),
    )
    op.create_index("ix_device_tags_tag", "device_tags", ["tag"])
    op.create_index("ix_device_tags_device_id", "device_tags", ["device_id"])
    # Plain ADD COLUMN: the rollout_progress view reads `rollouts`.
    op.add_column("rollouts", sa.Column("tag", sa.String(24), nullable=True))


def downgrade() -> None:
    # A tagged rollout would widen to its whole scope: it is stopped instead.
    op.execute(
        "UPDATE rollouts SET state = 'stopped', stopped_by = 'downgrade', running_key = NULL "
        "WHERE tag IS NOT NULL AND state IN ('scheduled', 'active', 'paused', 'complete')"
    )
    op.drop_column("rollouts", "tag")
    op.drop_table("device_tags")
