"""The fleet's accounts: users, projects and devices (registry.py), who a token
is (identities.py), admins and their login limits, the Blynk server's data
folder, and the devices connected to this process (online.py)."""

from .admins import AdminDirectory
from .audit import AuditTrail
from .blynk_data import BlynkDataError, read_blynk_folder
from .identities import DeviceIdentity, IdentityCache
from .online import (
    DeviceLink,
    FrameTooLarge,
    NoDownloadSlot,
    OfferDeferred,
    OfferFailed,
    OnlineDevices,
)
from .registry import (
    DeviceRow,
    FleetRegistry,
    ImportCounts,
    NewDevice,
    ProvisioningError,
    new_token,
)

__all__ = [
    "AdminDirectory",
    "AuditTrail",
    "BlynkDataError",
    "read_blynk_folder",
    "DeviceIdentity",
    "IdentityCache",
    "DeviceLink",
    "FrameTooLarge",
    "NoDownloadSlot",
    "OfferDeferred",
    "OfferFailed",
    "OnlineDevices",
    "DeviceRow",
    "FleetRegistry",
    "ImportCounts",
    "NewDevice",
    "ProvisioningError",
    "new_token",
]
