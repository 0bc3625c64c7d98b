"""The fleet's accounts: users, projects and devices (registry.py), who a token
is (identities.py), admins and their login limits, the Blynk server's data
folder, and the devices connected to this process (online.py)."""

from .admins import AdminDirectory
from .audit import AuditTrail
from .blynk_data import BlynkDataError, read_blynk_folder
from .device_search import DeviceFilter
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
from .tags import check_tag

__all__ = [
    "AdminDirectory",
    "AuditTrail",
    "BlynkDataError",
    "DeviceFilter",
    "check_tag",
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
