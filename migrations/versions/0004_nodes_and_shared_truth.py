"""nodes, presence per node, locks, one running rollout per target, firmware bytes in the database

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 06:30:00

Many processes serve one fleet from here on, so what spans them moves into
the database: the nodes and which of them holds each device, the named lock
rows, the unique key that lets one rollout run per scope and target, and the
firmware bytes (files of older uploads are taken in by the server at start-up,
from its data folder). Plain ADD COLUMN and CREATE INDEX, as in 0003: a batch
rebuild of `rollouts` is refused on SQLite while the progress view reads it.
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Times that decide between processes keep microseconds on MySQL too.
_PRECISE = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")
_TARGET_COLUMN = {"device": "device_id", "project": "project_id", "user": "user_id"}


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", _PRECISE, nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
        sa.UniqueConstraint("name", name=op.f("uq_nodes_name")),
    )
    locks = op.create_table(
        "locks",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.Integer(), nullable=True),
        sa.Column("expires_at", _PRECISE, nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_locks")),
    )
    op.bulk_insert(locks, [{"name": "offer-slots"}, {"name": "sweeper"}])
    op.create_table(
        "firmware_blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("md5", sa.String(length=32), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_firmware_blobs")),
    )
    op.create_table(
        "firmware_chunks",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column(
            "data", sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["sha256"],
            ["firmware_blobs.sha256"],
            name=op.f("fk_firmware_chunks_sha256_firmware_blobs"),
        ),
        sa.PrimaryKeyConstraint("sha256", "seq", name=op.f("pk_firmware_chunks")),
    )
    op.add_column("devices", sa.Column("node_id", sa.Integer(), nullable=True))
    op.add_column("devices", sa.Column("session_id", sa.BigInteger(), nullable=True))
    op.create_index(op.f("ix_devices_node_id"), "devices", ["node_id"])
    if op.get_bind().dialect.name == "mysql":
        # Logins on different nodes within one second must be told apart.
        op.alter_column(
            "devices", "online_since", type_=mysql.DATETIME(fsp=6), existing_nullable=True
        )
    op.add_column("rollouts", sa.Column("running_key", sa.String(length=48), nullable=True))

    # Existing running rollouts get their key; should two share a target (the
    # old code could leave that behind on MySQL), the newest keeps running.
    rollouts = sa.table(
        "rollouts",
        sa.column("id", sa.Integer),
        sa.column("scope", sa.String),
        sa.column("state", sa.String),
        sa.column("device_id", sa.Integer),
        sa.column("project_id", sa.Integer),
        sa.column("user_id", sa.Integer),
        sa.column("running_key", sa.String),
        sa.column("superseded_by_id", sa.Integer),
    )
    connection = op.get_bind()
    running = (
        connection.execute(
            sa.select(rollouts)
            .where(rollouts.c.state.in_(("active", "paused")))
            .order_by(rollouts.c.id.desc())
        )
        .mappings()
        .all()
    )
    keeper: dict[str, int] = {}
    for row in running:
        column = _TARGET_COLUMN.get(row["scope"])
        key = f"{row['scope']}:{row[column] if column else ''}"
        if key in keeper:
            values = {"state": "superseded", "superseded_by_id": keeper[key]}
        else:
            keeper[key] = row["id"]
            values = {"running_key": key}
        connection.execute(rollouts.update().where(rollouts.c.id == row["id"]).values(**values))
    op.create_index(op.f("ix_rollouts_running_key"), "rollouts", ["running_key"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_rollouts_running_key"), table_name="rollouts")
    op.drop_column("rollouts", "running_key")
    if op.get_bind().dialect.name == "mysql":
        op.alter_column("devices", "online_since", type_=sa.DateTime(), existing_nullable=True)
    op.drop_index(op.f("ix_devices_node_id"), table_name="devices")
    op.drop_column("devices", "session_id")
    op.drop_column("devices", "node_id")
    op.drop_table("firmware_chunks")
    op.drop_table("firmware_blobs")
    op.drop_table("locks")
    op.drop_table("nodes")
