"""Persistence: SQLAlchemy models, the engine and the migrations runner."""

from .db import Database, DatabaseHealth, is_outage, is_transient, make_engine
from .group_commit import GroupCommit, drain
from .hot_reads import HotQuery
from .many_rows import ManyRows, insert_many
from .migrate import alembic_config, upgrade
from .models import (
    CHUNK_BYTES,
    Admin,
    Base,
    Device,
    DeviceState,
    Firmware,
    FirmwareBlob,
    FirmwareChunk,
    Lock,
    LoginLimit,
    Node,
    OtaCommand,
    Project,
    Rollout,
    RolloutDevice,
    RolloutEvent,
    RolloutScope,
    RolloutState,
    User,
    utcnow,
)

__all__ = [
    "Database",
    "DatabaseHealth",
    "GroupCommit",
    "HotQuery",
    "ManyRows",
    "insert_many",
    "is_outage",
    "is_transient",
    "make_engine",
    "CHUNK_BYTES",
    "FirmwareBlob",
    "FirmwareChunk",
    "Lock",
    "LoginLimit",
    "Node",
    "alembic_config",
    "upgrade",
    "Admin",
    "Base",
    "Device",
    "Firmware",
    "OtaCommand",
    "Project",
    "Rollout",
    "DeviceState",
    "RolloutDevice",
    "RolloutEvent",
    "RolloutScope",
    "RolloutState",
    "User",
    "drain",
    "utcnow",
]
