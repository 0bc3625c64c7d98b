"""What an uploaded firmware file is: its build date and whether it is a sound image.

The build comes from the block the Blynk library compiles into every firmware
(`blnkinf\\0...\\0build\\0<__DATE__ __TIME__>\\0`), read exactly as the Blynk
server reads it: the bytes after the first `\\0build\\0`, up to the next NUL.
Image checks are esptool's: the same parser the flashing tools use.
"""

import logging
from dataclasses import dataclass

__all__ = ["FirmwareRejected", "ImageReport", "read_build", "inspect_firmware"]

BUILD_TAG = b"\0build\0"
IMAGE_MAGIC = 0xE9
_MAX_BUILD_LENGTH = 64  # the devices.build / firmware.build column width


class FirmwareRejected(ValueError):
    """The file cannot be sent to devices; the message says why, in one sentence."""


@dataclass(frozen=True)
class ImageReport:
    chip: str | None  # "esp8266", "esp32", "esp32s3", ... or None when not checked
    build: str | None


def read_build(data: bytes) -> str | None:
    start = data.find(BUILD_TAG)
    if start < 0:
        return None
    start += len(BUILD_TAG)
    end = data.find(b"\0", start, start + _MAX_BUILD_LENGTH + 1)
    if end <= start:
        return None
    try:
        build = data[start:end].decode("ascii")
    except UnicodeDecodeError:
        return None
    return build if build.isprintable() else None


def _detect_chip(data: bytes) -> str:
    """ESP32-family images carry a chip id in a 16-byte extended header; ESP8266 ones don't.

    The guess is esptool's: an ESP8266 image can look like an ESP32 one (its
    first segment header takes the extended header's place), so callers try
    ESP8266 too when the guessed chip does not parse.
    """
    from esptool.targets import ROM_LIST

    extended = data[8:24]
    if len(extended) == 16 and extended[15] in (0, 1):
        chip_id = int.from_bytes(extended[4:6], "little")
        for rom in ROM_LIST:
            if getattr(rom, "IMAGE_CHIP_ID", None) == chip_id:
                return rom.CHIP_NAME.lower().replace("-", "")
    return "esp8266"


def _check_as(chip: str, data: bytes) -> None:
    """Raises FirmwareRejected unless `data` is a sound `chip` application image."""
    from esptool.bin_image import LoadFirmwareImage

    # esptool logs through its own logger; keep its warnings out of ours.
    logging.getLogger("esptool").setLevel(logging.ERROR)
    try:
        image = LoadFirmwareImage(chip, data)
    except Exception as error:  # esptool raises FatalError, struct.error, ...
        raise FirmwareRejected(f"The {chip.upper()} image is damaged: {error}.") from None
    computed = image.calculate_checksum()
    if image.checksum != computed:
        raise FirmwareRejected(
            f"The {chip.upper()} image checksum is 0x{image.checksum:02X} but its "
            f"segments sum to 0x{computed:02X}: the file is damaged."
        )
    stored = getattr(image, "stored_digest", None)
    if getattr(image, "append_digest", False) and stored != image.calc_digest:
        raise FirmwareRejected(
            f"The SHA-256 appended to the {chip.upper()} image does not match its "
            "content: the file is damaged."
        )


def _check_image(data: bytes) -> str:
    if not data:
        raise FirmwareRejected("The file is empty.")
    if data[0] != IMAGE_MAGIC:
        raise FirmwareRejected(
            f"Not an ESP8266/ESP32 application image: it starts with byte "
            f"0x{data[0]:02X}, not 0xE9 (set ota.validate.image=false to send raw files)."
        )
    guessed = _detect_chip(data)
    try:
        _check_as(guessed, data)
        return guessed
    except FirmwareRejected:
        if guessed == "esp8266":
            raise
        try:
            _check_as("esp8266", data)
        except FirmwareRejected:
            pass
        else:
            return "esp8266"
        raise


def inspect_firmware(data: bytes, *, validate_image: bool) -> ImageReport:
    if validate_image:
        chip = _check_image(data)
    elif data:
        chip = _detect_chip(data) if data[0] == IMAGE_MAGIC else None
    else:
        raise FirmwareRejected("The file is empty.")
    return ImageReport(chip=chip, build=read_build(data))
