"""Firmware identity: versions and types from image and device, signatures, one row per content

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 03:00:00

Devices gain their firmware type (`fw-type`); firmware gains what its
`blnkinf` block says (version, type, library version), the fingerprint of
the key that signed it, and `live_sha256`: its content hash while stored,
unique, so that uploading the same bytes again reuses the row. Of the rows
that share a content today, the newest stored one takes the hash. Rollouts
gain allow_downgrade.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: Union[str, Sequence[str], None] = "0010"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


_FIRMWARE_COLUMNS = [
    sa.Column("fw_version", sa.String(64), nullable=True),
    sa.Column("fw_type", sa.String(64), nullable=True),
    sa.Column("lib_version", sa.String(32), nullable=True),
    sa.Column("signed_by", sa.String(64), nullable=True),
    sa.Column("live_sha256", sa.String(64), nullable=True),
]


# Plain ADD COLUMN and a unique index, no batch: on SQLite a batch rebuilds
# the table, which the rollout_progress view (it reads `firmware`) does not allow.
def upgrade() -> None:
    op.add_column("devices", sa.Column("fw_type", sa.String(64), nullable=True))
    for column in _FIRMWARE_COLUMNS:
        op.add_column("firmware", column)
    firmware = sa.table(
        "firmware",
        sa.column("id", sa.Integer),
        sa.column("sha256", sa.String),
        sa.column("live_sha256", sa.String),
        sa.column("deleted_at", sa.DateTime),
    )
    connection = op.get_bind()
    newest = connection.execute(
        sa.select(sa.func.max(firmware.c.id))
        .where(firmware.c.deleted_at.is_(None))
        .group_by(firmware.c.sha256)
    ).scalars()
    for firmware_id in list(newest):
        connection.execute(
            firmware.update()
            .where(firmware.c.id == firmware_id)
            .values(live_sha256=firmware.c.sha256)
        )
    op.create_index("ix_firmware_live_sha256", "firmware", ["live_sha256"], unique=True)
    op.add_column(
        "rollouts",
        sa.Column("allow_downgrade", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_column("rollouts", "allow_downgrade")
    op.drop_index("ix_firmware_live_sha256", table_name="firmware")
    for column in reversed(_FIRMWARE_COLUMNS):
        op.drop_column("firmware", column.name)
    op.drop_column("devices", "fw_type")
