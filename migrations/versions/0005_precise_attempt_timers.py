"""microseconds for the attempt times of rollout_devices on MySQL

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 10:45:00

A DATETIME without fractional seconds cut a backoff of `ota.retry.backoff`
seconds short by up to one second on MySQL (the retry was due when its time
was rounded down), and a timeout likewise. Every time a device's row
records gets microseconds, so that the times still read in the order the
steps happened. One ALTER TABLE for all of them (one rebuild of the table).
SQLite keeps microseconds already: there this revision changes nothing.
"""

from typing import Sequence, Union

from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# column -> NULL allowed
_TIMES = {
    "pending_at": False,
    "first_offered_at": True,
    "offered_at": True,
    "downloading_at": True,
    "downloaded_at": True,
    "updated_at": True,
    "failed_at": True,
    "ended_at": True,
    "next_attempt_at": True,
}


def _modify(precision: str) -> None:
    changes = ", ".join(
        f"MODIFY {column} {precision} {'NULL' if nullable else 'NOT NULL'}"
        for column, nullable in _TIMES.items()
    )
    op.execute(f"ALTER TABLE rollout_devices {changes}")


def upgrade() -> None:
    if op.get_bind().dialect.name == "mysql":
        _modify("DATETIME(6)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "mysql":
        _modify("DATETIME")
