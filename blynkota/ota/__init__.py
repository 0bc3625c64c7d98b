"""The OTA domain: the fleet, firmware images, rollouts. Knows nothing of sockets or HTTP.

- fleet/: users, projects, devices, admins and their login limits, the Blynk
  import, and the devices connected to this process.
- firmware/: what an image says of itself, its signature, the catalog of
  uploads and the node's cache of their files.
- rollouts/: the rollout engine: which rollout a device is in, its update
  states, offers, waves and guards.
- here: the service's parts as callers take them (the device side, the
  download tracker, the admin part, the rollout clock), wired by
  `build_service`, and the refusals the domain answers with (errors.py).
"""

from .admin import RolloutAdmin
from .answers import Started
from .clock import RolloutClock
from .device_side import DeviceSide
from .download_tracker import DownloadTicket, DownloadTracker
from .errors import Conflict, NotFound, OtaError, Refused
from .firmware import (
    CacheError,
    FirmwareCache,
    FirmwareCatalog,
    FirmwareFile,
    FirmwareRejected,
    ImageReport,
    Upload,
    inspect_firmware,
    read_build,
    served_path,
)
from .fleet import (
    AdminDirectory,
    AuditTrail,
    BlynkDataError,
    DeviceFilter,
    DeviceIdentity,
    DeviceLink,
    DeviceRow,
    FleetRegistry,
    FrameTooLarge,
    ImportCounts,
    NewDevice,
    NoDownloadSlot,
    OfferDeferred,
    OfferFailed,
    OnlineDevices,
    ProvisioningError,
    check_tag,
    new_token,
    read_blynk_folder,
)
from .rollouts import (
    TRANSITIONS,
    Candidate,
    Controls,
    ControlsError,
    FleetPolicy,
    HealthPolicy,
    IllegalDeviceTransition,
    RetryPolicy,
)
from .service import OtaService, build_service

__all__ = [
    "RolloutAdmin",
    "Started",
    "RolloutClock",
    "DeviceSide",
    "DownloadTicket",
    "DownloadTracker",
    "Conflict",
    "NotFound",
    "OtaError",
    "Refused",
    "CacheError",
    "FirmwareCache",
    "FirmwareCatalog",
    "FirmwareFile",
    "FirmwareRejected",
    "ImageReport",
    "Upload",
    "inspect_firmware",
    "read_build",
    "served_path",
    "AdminDirectory",
    "AuditTrail",
    "BlynkDataError",
    "DeviceFilter",
    "DeviceIdentity",
    "DeviceLink",
    "DeviceRow",
    "FleetRegistry",
    "FrameTooLarge",
    "ImportCounts",
    "NewDevice",
    "NoDownloadSlot",
    "OfferDeferred",
    "OfferFailed",
    "OnlineDevices",
    "ProvisioningError",
    "check_tag",
    "new_token",
    "read_blynk_folder",
    "TRANSITIONS",
    "Candidate",
    "Controls",
    "ControlsError",
    "FleetPolicy",
    "IllegalDeviceTransition",
    "HealthPolicy",
    "RetryPolicy",
    "OtaService",
    "build_service",
]
