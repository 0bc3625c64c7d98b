"""Firmware images made by the tests themselves, with esptool's image writer.

Each carries the block the Blynk library compiles into a sketch, so the
server can read its build, and is a valid ESP8266 or ESP32 application image.
"""

import tempfile
from pathlib import Path

from esptool.bin_image import ESP32FirmwareImage, ESP8266ROMFirmwareImage, ImageSegment

__all__ = ["blynk_info_block", "esp8266_image", "esp32_image"]


def blynk_info_block(
    build: str | None, *, fw: str | None = None, fields: dict[str, str] | None = None
) -> bytes:
    """The block as library 0.6.1 lays it out, or with `fields` (1.x: `mcu`,
    `fw-type`, `blynk`...) in their place, the build after them."""
    if fields is None:
        fields = {"ver": "0.6.1", "h-beat": "10", "buff-in": "256", "dev": "ESP8266"}
        if fw:
            fields["fw"] = fw
    if build is not None:
        fields = {**fields, "build": build}
    words = ["blnkinf", *(word for pair in fields.items() for word in pair)]
    return "\0".join(words).encode() + b"\0\0"


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def esp8266_image(
    build: str | None,
    *,
    size: int = 4096,
    fw: str | None = None,
    fields: dict[str, str] | None = None,
) -> bytes:
    image = ESP8266ROMFirmwareImage()
    image.entrypoint = 0x40100000
    payload = blynk_info_block(build, fw=fw, fields=fields)
    payload += bytes((i * 7) & 0xFF for i in range(max(0, size - len(payload))))
    image.segments.append(ImageSegment(0x3FFE8000, _padded(payload)))
    with tempfile.TemporaryDirectory() as folder:
        prefix = Path(folder) / "image"
        image.save(str(prefix))
        return Path(f"{prefix}0x00000.bin").read_bytes()


def esp32_image(
    build: str | None, *, size: int = 4096, fields: dict[str, str] | None = None
) -> bytes:
    image = ESP32FirmwareImage()
    image.entrypoint = 0x40080000
    image.append_digest = True
    payload = blynk_info_block(build, fields=fields)
    payload += bytes((i * 13) & 0xFF for i in range(max(0, size - len(payload))))
    segment = ImageSegment(0x3FFB0000, _padded(payload))
    segment.name = ".dram0.data"  # esptool's ESP32 writer names segments in its log
    image.segments.append(segment)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image.bin"
        image.save(str(path))
        return path.read_bytes()
