"""Health window: devices verify the new build before they count as updated

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 12:00:00

rollout_devices gains `verifying_at` (when the device first reported the
rollout's build after an attempt: its health window opened), `health_logins`
(its logins since, that one included) and `health` (how the window ended:
passed, crash_loop, rollback, silence; NULL: not judged). Rollouts gain
`health_window` (healthWindow=, seconds; NULL: ota.health.window). Existing
rows keep their states: a device updated before this revision stays updated.

The rollout_progress view gains `verifying`.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0012"
down_revision: Union[str, Sequence[str], None] = "0011"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


# The view as 0009 made it; this revision adds `verifying` at its end, so that
# `SELECT *` readers that take columns by position keep theirs.
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
    SUM(CASE WHEN d.already_current = 1 THEN 1 ELSE 0 END) AS already_up_to_date,
    SUM(CASE WHEN d.state = 'incompatible' THEN 1 ELSE 0 END) AS incompatible,
    SUM(CASE WHEN d.reverts > 0 THEN 1 ELSE 0 END) AS reverted"""
_VERIFYING = """,
    SUM(CASE WHEN d.state = 'verifying' THEN 1 ELSE 0 END) AS verifying"""


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
_DEVICE_COLUMNS = [
    sa.Column("verifying_at", _PRECISE, nullable=True),
    sa.Column("health_logins", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("health", sa.String(16), nullable=True),
]


# Plain ADD COLUMN, no batch: on SQLite a batch rebuilds the table, which the
# view (it reads both tables) does not allow; the view is made again last.
def upgrade() -> None:
    op.execute("DROP VIEW rollout_progress")
    for column in _DEVICE_COLUMNS:
        op.add_column("rollout_devices", column)
    op.add_column("rollouts", sa.Column("health_window", sa.Integer(), nullable=True))
    op.execute(_view(_COUNTS + _VERIFYING))


def downgrade() -> None:
    op.execute("DROP VIEW rollout_progress")
    # Devices verifying have reported the rollout's build: updated, as they
    # counted before this revision.
    op.execute("UPDATE rollout_devices SET state = 'updated' WHERE state = 'verifying'")
    op.drop_column("rollouts", "health_window")
    for column in reversed(_DEVICE_COLUMNS):
        op.drop_column("rollout_devices", column.name)
    op.execute(_view(_COUNTS))
