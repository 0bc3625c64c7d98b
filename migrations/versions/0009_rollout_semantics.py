"""rollout semantics: regressions counted per device, incompatible devices in the progress view

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 17:30:00

rollout_devices.reverts counts the times a device came back on another build
after it had updated while its rollout still owned it (a rollback, a
re-flash by hand). Existing rows start at 0: no regression was recorded
before, and every rollout carries over unchanged.

Rollouts gain their own limits (NULL: the server's setting, which is what
every existing rollout keeps using) and the time their current wave opened.

An offer records the node and the run of it that made it (nodes.runs counts
a slot's runs): when that run ends before the download completed, the
attempt was cut by the server, and is not charged to the device.

A deleted firmware keeps its row (rollouts name it) with firmware.deleted_at
set; its bytes go.

The rollout_progress view gains two columns: `incompatible` (devices whose
reported hardware cannot run the image, never offered it) and `reverted`
(devices that came back on another build after updating, at least once).
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0009"
down_revision: Union[str, Sequence[str], None] = "0008"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


_COUNTS = """
    COUNT(d.id) AS devices,
    SUM(CASE WHEN d.state = 'pending' THEN 1 ELSE 0 END) AS pending,
    SUM(CASE WHEN d.state = 'offered' THEN 1 ELSE 0 END) AS offered,
    SUM(CASE WHEN d.state = 'downloading' THEN 1 ELSE 0 END) AS downloading,
    SUM(CASE WHEN d.state = 'downloaded' THEN 1 ELSE 0 END) AS downloaded,
    SUM(CASE WHEN d.state = 'updated' THEN 1 ELSE 0 END) AS updated,
    SUM(CASE WHEN d.state = 'failed' THEN 1 ELSE 0 END) AS failed,
    SUM(CASE WHEN d.state = 'cancelled' THEN 1 ELSE 0 END) AS cancelled,
    SUM(CASE WHEN d.state = 'superseded' THEN 1 ELSE 0 END) AS superseded,
    SUM(CASE WHEN d.already_current = 1 THEN 1 ELSE 0 END) AS already_up_to_date"""
_NEW_COUNTS = """,
    SUM(CASE WHEN d.state = 'incompatible' THEN 1 ELSE 0 END) AS incompatible,
    SUM(CASE WHEN d.reverts > 0 THEN 1 ELSE 0 END) AS reverted"""


def _view(counts: str) -> str:
    return f"""
CREATE VIEW rollout_progress AS
SELECT
    r.id AS rollout_id,
    r.scope AS scope,
    r.state AS state,
    f.build AS build,{counts}
FROM rollouts r
JOIN firmware f ON f.id = r.firmware_id
LEFT JOIN rollout_devices d ON d.rollout_id = r.id
GROUP BY r.id, r.scope, r.state, f.build
"""


_PRECISE = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")
_ROLLOUT_LIMITS = [
    sa.Column("max_concurrent", sa.Integer(), nullable=True),
    sa.Column("attempt_timeout", sa.Integer(), nullable=True),
    sa.Column("max_attempts", sa.Integer(), nullable=True),
    sa.Column("abort_ratio", sa.Float(), nullable=True),
    sa.Column("wave_delay", sa.Integer(), nullable=True),
    sa.Column("wave_opened_at", _PRECISE, nullable=True),
]


_OFFER_NODE = [
    sa.Column("offer_node_id", sa.Integer(), nullable=True),
    sa.Column("offer_node_run", sa.Integer(), nullable=True),
]


def upgrade() -> None:
    op.add_column(
        "rollout_devices",
        sa.Column("reverts", sa.Integer(), nullable=False, server_default="0"),
    )
    for column in _OFFER_NODE:
        op.add_column("rollout_devices", column)
    op.add_column("nodes", sa.Column("runs", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("firmware", sa.Column("deleted_at", sa.DateTime(), nullable=True))
    for column in _ROLLOUT_LIMITS:
        op.add_column("rollouts", column)
    op.execute("DROP VIEW rollout_progress")
    op.execute(_view(_COUNTS + _NEW_COUNTS))


def downgrade() -> None:
    op.execute("DROP VIEW rollout_progress")
    op.drop_column("firmware", "deleted_at")
    op.drop_column("nodes", "runs")
    for column in reversed(_OFFER_NODE):
        op.drop_column("rollout_devices", column.name)
    op.drop_column("rollout_devices", "reverts")
    for column in reversed(_ROLLOUT_LIMITS):
        op.drop_column("rollouts", column.name)
    op.execute(_view(_COUNTS))
