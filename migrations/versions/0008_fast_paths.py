"""fast paths: rollouts.enrol_due_at, and rollout_devices indexed by (device_id, state)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 16:45:00

A now=true start answers before it has entered the connected devices; this
column says the work is owed until it is done, so that the sweeper finishes
it if the process that answered stops first. Existing rollouts get NULL:
nothing is owed for them.

Every batch of info messages reads the open attempts of its devices. With
only a device_id index and a (state, next_attempt_at) one, SQLite chose the
latter and read every open attempt of the fleet for each batch: a campaign
with thousands offered made each batch slower. (device_id, state) answers
that query from the index, and replaces the device_id index (a foreign key's
index on MySQL, which the new one serves too).
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0008"
down_revision: Union[str, Sequence[str], None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column(
        "rollouts",
        sa.Column(
            "enrol_due_at",
            sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=True,
        ),
    )
    op.create_index("ix_rollout_devices_device_id_state", "rollout_devices", ["device_id", "state"])
    op.drop_index("ix_rollout_devices_device_id", table_name="rollout_devices")


def downgrade() -> None:
    op.create_index("ix_rollout_devices_device_id", "rollout_devices", ["device_id"])
    op.drop_index("ix_rollout_devices_device_id_state", table_name="rollout_devices")
    op.drop_column("rollouts", "enrol_due_at")
