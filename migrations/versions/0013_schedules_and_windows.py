"""Schedules and offer windows: startAt=, window=, tz=

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 13:00:00

Rollouts gain `start_at` (a `scheduled` rollout starts then), and
`window_start`/`window_end` (minutes of the day) with `window_tz` (an IANA
zone): offers only inside that window. Existing rollouts have neither, and
run as before.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0013"
down_revision: Union[str, Sequence[str], None] = "0012"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_PRECISE = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")
_COLUMNS = [
    sa.Column("start_at", _PRECISE, nullable=True),
    sa.Column("window_start", sa.Integer(), nullable=True),
    sa.Column("window_end", sa.Integer(), nullable=True),
    sa.Column("window_tz", sa.String(64), nullable=True),
]


# Plain ADD COLUMN, no batch: on SQLite a batch rebuilds the table, which the
# rollout_progress view (it reads `rollouts`) does not allow.
def upgrade() -> None:
    for column in _COLUMNS:
        op.add_column("rollouts", column)


def downgrade() -> None:
    # A rollout still waiting for its start cannot be told apart once the
    # column is gone: it is stopped.
    op.execute(
        "UPDATE rollouts SET state = 'stopped', stopped_by = 'downgrade' WHERE state = 'scheduled'"
    )
    for column in reversed(_COLUMNS):
        op.drop_column("rollouts", column.name)
