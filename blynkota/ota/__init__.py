"""The OTA domain: firmware, targeting, rollouts. Knows nothing of sockets or HTTP."""

from .admin_ops import Started
from .admins import AdminDirectory
from .blynk_data import BlynkDataError, read_blynk_folder
from .catalog import FirmwareCatalog, FirmwareFile, Upload, served_path
from .cohorts import Controls, ControlsError
from .device_states import TRANSITIONS, IllegalDeviceTransition
from .errors import OtaRequestError
from .firmware import FirmwareRejected, ImageReport, inspect_firmware, read_build
from .firmware_store import CacheError, FirmwareCache
from .fleet import (
    DeviceRow,
    FleetRegistry,
    ImportCounts,
    NewDevice,
    ProvisioningError,
    new_token,
)
from .guards import FleetPolicy, RolloutGuards
from .lifecycle import RetryPolicy, UpdateLifecycle
from .offers import DeviceIdentity, DownloadTicket, Offer
from .online import (
    DeviceLink,
    FrameTooLarge,
    NoDownloadSlot,
    OfferDeferred,
    OfferFailed,
    OnlineDevices,
)
from .rollouts import Candidate, RolloutPlanner
from .service import OtaService

__all__ = [
    "AdminDirectory",
    "Started",
    "BlynkDataError",
    "read_blynk_folder",
    "FirmwareCatalog",
    "FirmwareFile",
    "Upload",
    "served_path",
    "Controls",
    "ControlsError",
    "FleetPolicy",
    "RolloutGuards",
    "OfferDeferred",
    "NoDownloadSlot",
    "TRANSITIONS",
    "IllegalDeviceTransition",
    "FirmwareRejected",
    "ImageReport",
    "inspect_firmware",
    "read_build",
    "CacheError",
    "FirmwareCache",
    "DeviceRow",
    "FleetRegistry",
    "ImportCounts",
    "NewDevice",
    "ProvisioningError",
    "new_token",
    "RetryPolicy",
    "UpdateLifecycle",
    "DeviceLink",
    "OfferFailed",
    "FrameTooLarge",
    "OnlineDevices",
    "Candidate",
    "RolloutPlanner",
    "DeviceIdentity",
    "DownloadTicket",
    "Offer",
    "OtaRequestError",
    "OtaService",
]
