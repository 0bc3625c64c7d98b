"""The OTA domain: firmware, targeting, rollouts. Knows nothing of sockets or HTTP."""

from .admins import AdminDirectory
from .blynk_data import BlynkDataError, read_blynk_folder
from .firmware import FirmwareRejected, ImageReport, inspect_firmware, read_build
from .firmware_store import FirmwareStore
from .fleet import DeviceRow, FleetRegistry, ImportCounts, ProvisioningError, new_token
from .online import DeviceLink, OfferFailed, OnlineDevices
from .rollouts import RolloutPlanner
from .service import (
    DeviceIdentity,
    FirmwareFile,
    Offer,
    OtaRequestError,
    OtaService,
    Upload,
    served_path,
)

__all__ = [
    "AdminDirectory",
    "BlynkDataError",
    "read_blynk_folder",
    "FirmwareRejected",
    "ImageReport",
    "inspect_firmware",
    "read_build",
    "FirmwareStore",
    "DeviceRow",
    "FleetRegistry",
    "ImportCounts",
    "ProvisioningError",
    "new_token",
    "DeviceLink",
    "OfferFailed",
    "OnlineDevices",
    "RolloutPlanner",
    "DeviceIdentity",
    "FirmwareFile",
    "Offer",
    "OtaRequestError",
    "OtaService",
    "Upload",
    "served_path",
]
