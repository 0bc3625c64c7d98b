"""Admin roles and the audit trail

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 15:00:00

admins.role: viewer, operator or admin; every existing account is `admin`,
as it could do everything before. audit_entries: one row per state-changing
request (API, dashboard) or command (the command line), append-only.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0015"
down_revision: Union[str, Sequence[str], None] = "0014"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_PRECISE = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")


def upgrade() -> None:
    op.add_column(
        "admins", sa.Column("role", sa.String(16), nullable=False, server_default="admin")
    )
    op.create_table(
        "audit_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", _PRECISE, nullable=False),
        sa.Column("admin", sa.String(255), nullable=False),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("device", sa.String(16), nullable=True),
        sa.Column("firmware", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("detail", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_entries")),
    )
    op.create_index("ix_audit_entries_at", "audit_entries", ["at"])


def downgrade() -> None:
    op.drop_table("audit_entries")
    with op.batch_alter_table("admins") as batch:
        batch.drop_column("role")
