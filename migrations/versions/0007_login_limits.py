"""login_limits: the failed-password budget of each client address and admin account

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 13:20:00

Shared by every process, so a brute force spread over several workers meets
one limit.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0007"
down_revision: Union[str, Sequence[str], None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "login_limits",
        sa.Column("key", sa.String(191), nullable=False),
        sa.Column(
            "window_start",
            sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=False,
        ),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_login_limits")),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("login_limits")
