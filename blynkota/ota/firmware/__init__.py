"""Firmware images: what an image says of itself (image.py), who signed it
(signatures.py), the catalog of uploads (catalog.py) and this node's cache of
their files (cache.py)."""

from .cache import CacheError, FirmwareCache
from .catalog import FirmwareCatalog, FirmwareFile, Upload, served_path
from .image import FirmwareRejected, ImageReport, inspect_firmware, read_build

__all__ = [
    "CacheError",
    "FirmwareCache",
    "FirmwareCatalog",
    "FirmwareFile",
    "Upload",
    "served_path",
    "FirmwareRejected",
    "ImageReport",
    "inspect_firmware",
    "read_build",
]
