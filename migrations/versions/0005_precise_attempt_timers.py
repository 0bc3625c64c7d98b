"""microseconds for the attempt timers on MySQL (offered_at, next_attempt_at)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 10:45:00

A DATETIME without fractional seconds cut a backoff of `ota.retry.backoff`
seconds short by up to one second on MySQL, and a timeout likewise: the
retry was due when its time was rounded down. SQLite keeps microseconds
already, so there this revision changes nothing.
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_TIMERS = ("offered_at", "next_attempt_at")


def upgrade() -> None:
    if op.get_bind().dialect.name != "mysql":
        return
    for column in _TIMERS:
        op.alter_column(
            "rollout_devices", column, type_=mysql.DATETIME(fsp=6), existing_nullable=True
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "mysql":
        return
    for column in _TIMERS:
        op.alter_column("rollout_devices", column, type_=sa.DateTime(), existing_nullable=True)
