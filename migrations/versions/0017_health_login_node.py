"""The node run that held a verifying device's last login

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 20:40:00

`rollout_devices.health_node_id` and `health_node_run`: the node (and its run)
that held the session of a verifying device's last login. When that run has
ended by the device's next login, the server closed the session (a restart,
a deploy), not the device: that login is not counted towards a crash loop.
Rows verifying before this revision have none: their next login counts, as
before.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: Union[str, Sequence[str], None] = "0016"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_HEALTH_NODE = ("health_node_id", "health_node_run")


def upgrade() -> None:
    # Plain ADD COLUMN (nullable): the rollout_progress view reads rollout_devices.
    for name in _HEALTH_NODE:
        op.add_column("rollout_devices", sa.Column(name, sa.Integer(), nullable=True))


def downgrade() -> None:
    for name in reversed(_HEALTH_NODE):
        op.drop_column("rollout_devices", name)
