"""rollout_devices indexed by (state, rollout_id): download slots counted from the index

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 22:40:00

Every batch of offers counts the devices holding a download slot (offered
or downloading), server-wide and per rollout, while the offer-slots row is
locked. With this index that count is one scan of the index entries of the
rows in flight, grouped by rollout, without reading a table row.
"""

from typing import Sequence, Union

from alembic import op

revision: str = "0010"
down_revision: Union[str, Sequence[str], None] = "0009"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index(
        "ix_rollout_devices_state_rollout_id", "rollout_devices", ["state", "rollout_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_rollout_devices_state_rollout_id", table_name="rollout_devices")
