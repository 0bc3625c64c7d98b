"""per-device rollout states and the event log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 04:46:32.914985

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# Per-rollout progress for operators: `SELECT * FROM rollout_progress`.
PROGRESS_VIEW = """
CREATE VIEW rollout_progress AS
SELECT
    r.id AS rollout_id,
    r.scope AS scope,
    r.state AS state,
    f.build AS build,
    COUNT(d.id) AS devices,
    SUM(CASE WHEN d.state = 'pending' THEN 1 ELSE 0 END) AS pending,
    SUM(CASE WHEN d.state = 'offered' THEN 1 ELSE 0 END) AS offered,
    SUM(CASE WHEN d.state = 'downloading' THEN 1 ELSE 0 END) AS downloading,
    SUM(CASE WHEN d.state = 'downloaded' THEN 1 ELSE 0 END) AS downloaded,
    SUM(CASE WHEN d.state = 'updated' THEN 1 ELSE 0 END) AS updated,
    SUM(CASE WHEN d.state = 'failed' THEN 1 ELSE 0 END) AS failed,
    SUM(CASE WHEN d.state = 'cancelled' THEN 1 ELSE 0 END) AS cancelled,
    SUM(CASE WHEN d.state = 'superseded' THEN 1 ELSE 0 END) AS superseded,
    SUM(CASE WHEN d.already_current = 1 THEN 1 ELSE 0 END) AS already_up_to_date
FROM rollouts r
JOIN firmware f ON f.id = r.firmware_id
LEFT JOIN rollout_devices d ON d.rollout_id = r.id
GROUP BY r.id, r.scope, r.state, f.build
"""

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "rollout_devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("already_current", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.String(length=255), nullable=True),
        sa.Column("bytes_sent", sa.Integer(), nullable=True),
        sa.Column("pending_at", sa.DateTime(), nullable=False),
        sa.Column("first_offered_at", sa.DateTime(), nullable=True),
        sa.Column("offered_at", sa.DateTime(), nullable=True),
        sa.Column("downloading_at", sa.DateTime(), nullable=True),
        sa.Column("downloaded_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=True),
        sa.Column("failed_at", sa.DateTime(), nullable=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_rollout_devices_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_rollout_devices_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_devices")),
        sa.UniqueConstraint("rollout_id", "device_id", name=op.f("uq_rollout_devices_rollout_id")),
    )
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_rollout_devices_device_id"), ["device_id"], unique=False
        )
        batch_op.create_index(
            "ix_rollout_devices_state_next_attempt_at", ["state", "next_attempt_at"], unique=False
        )

    op.create_table(
        "rollout_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=True),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("detail", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_rollout_events_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_rollout_events_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_events")),
    )
    with op.batch_alter_table("rollout_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_rollout_events_device_id"), ["device_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_rollout_events_rollout_id"), ["rollout_id"], unique=False
        )

    with op.batch_alter_table("ota_commands", schema=None) as batch_op:
        batch_op.add_column(sa.Column("offer_key", sa.String(length=16), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_ota_commands_offer_key"), ["offer_key"])

    op.execute(PROGRESS_VIEW)


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DROP VIEW rollout_progress")
    with op.batch_alter_table("ota_commands", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_ota_commands_offer_key"), type_="unique")
        batch_op.drop_column("offer_key")

    # Tables go with their indexes (MySQL refuses to drop an index a foreign key needs).
    op.drop_table("rollout_events")
    op.drop_table("rollout_devices")
