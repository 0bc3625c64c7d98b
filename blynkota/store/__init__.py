"""Persistence: SQLAlchemy models, the engine and the migrations runner."""

from .db import Database, make_engine
from .migrate import alembic_config, upgrade
from .models import (
    Admin,
    Base,
    Device,
    DeviceState,
    Firmware,
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
    "make_engine",
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
    "utcnow",
]
