"""What an uploaded firmware file is: its identity and whether it is a sound image.

The build comes from the block the Blynk library compiles into every firmware
(`blnkinf\\0...\\0build\\0<__DATE__ __TIME__>\\0`), read exactly as the Blynk
server reads it: the bytes after the first `\\0build\\0`, up to the next NUL.
The rest of that block (`read_identity`) names the firmware's version (`fw`,
or `mcu`/`ncp` from library 1.3), its type (`fw-type`) and the library's
version (`ver`, or `blynk`), as the device's info message does.
Image checks are esptool's: the same parser the flashing tools use.
"""

import contextlib
import io
import logging
from dataclasses import dataclass

from ...protocol import identity_words
from .signatures import SigningError, signer_of

__all__ = ["FirmwareRejected", "ImageReport", "read_build", "read_identity", "inspect_firmware"]

BUILD_TAG = b"\0build\0"
INFO_TAG = b"blnkinf\0"
_INFO_BLOCK_LIMIT = 1024  # bytes of the block read at most: a few dozen short words
IMAGE_MAGIC = 0xE9
APP_OFFSET = 0x1000  # where an Arduino ESP8266 file's application image starts
log = logging.getLogger(__name__)

_MAX_BUILD_LENGTH = 64  # the devices.build / firmware.build column width


class FirmwareRejected(ValueError):
    """The file cannot be sent to devices; the message says why, in one sentence."""


@dataclass(frozen=True)
class ImageReport:
    chip: str | None  # "esp8266", "esp32", "esp32s3", ... or None when not checked
    build: str | None
    fw_version: str | None = None
    fw_type: str | None = None
    lib_version: str | None = None
    signed_by: str | None = None  # the signing key's fingerprint (signatures.py)


def read_identity(data: bytes) -> dict[str, str | None]:
    """fw_version, fw_type and lib_version from the first `blnkinf` block (None
    where it has no such key, or no block): words up to the empty one that
    ends the block, printable ASCII only (the catalog cuts them to their
    columns, and says so)."""
    start = data.find(INFO_TAG)
    if start < 0:
        return identity_words({})
    block = data[start + len(INFO_TAG) : start + len(INFO_TAG) + _INFO_BLOCK_LIMIT]
    block = block.split(b"\0\0", 1)[0]
    words = block.split(b"\0")
    pairs = {}
    for key, value in zip(words[0::2], words[1::2], strict=False):
        try:
            key_text, value_text = key.decode("ascii"), value.decode("ascii")
        except UnicodeDecodeError:
            continue
        if key_text and value_text.isprintable() and key_text not in pairs:
            pairs[key_text] = value_text
    return identity_words(pairs)


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
    """Raises FirmwareRejected unless `data` is a sound `chip` application image.

    An ESP8266 sketch from the Arduino tools is two images in one file: the
    boot loader (eboot) at offset 0, then the application at 0x1000 (its
    own header, segments and checksum). Both are checked, so a file cut
    short or a byte flipped anywhere in what the chip loads is refused.
    """
    _check_one(chip, data, 0)
    if chip == "esp8266" and _image_end(data, 0) <= APP_OFFSET < len(data):
        if data[APP_OFFSET] != IMAGE_MAGIC:
            raise FirmwareRejected(
                f"The ESP8266 file has data at 0x{APP_OFFSET:X} that is not an application "
                f"image (byte 0x{data[APP_OFFSET]:02X}, not 0xE9): the file is damaged."
            )
        _check_one(chip, data, APP_OFFSET)


def _check_one(chip: str, data: bytes, offset: int) -> None:
    from esptool.bin_image import LoadFirmwareImage

    where = f"The {chip.upper()} image at offset 0x{offset:X}"
    declared = _image_end(data, offset) if chip == "esp8266" else 0
    if declared > len(data):  # the checksum is the last byte of the padded image
        raise FirmwareRejected(
            f"{where} is damaged: cut short, its segments end at 0x{declared:X}, "
            f"the file at 0x{len(data):X}."
        )
    # esptool prints its remarks ("Suspicious segment" for every Arduino
    # sketch's flash segment): kept out of the server's output, for debugging.
    # The parse never yields to another greenlet, so the swap is local to it.
    remarks = io.StringIO()
    try:
        with contextlib.redirect_stdout(remarks), contextlib.redirect_stderr(remarks):
            image = LoadFirmwareImage(chip, data[offset:])
    except Exception as error:  # esptool raises FatalError, struct.error, ...
        raise FirmwareRejected(f"{where} is damaged or cut short: {error}.") from None
    finally:
        if remarks.getvalue():
            log.debug("esptool on %s: %s", where[4:], remarks.getvalue().strip())
    computed = image.calculate_checksum()
    if image.checksum != computed:
        raise FirmwareRejected(
            f"{where} has checksum 0x{image.checksum:02X} but its segments sum to "
            f"0x{computed:02X}: the file is damaged."
        )
    stored = getattr(image, "stored_digest", None)
    if getattr(image, "append_digest", False) and stored != image.calc_digest:
        raise FirmwareRejected(
            f"The SHA-256 appended to {where[4:]} does not match its content: the file is damaged."
        )


def _image_end(data: bytes, offset: int) -> int:
    """Where an ESP8266 image that starts at `offset` ends, as its headers
    declare: its header, each segment (an 8-byte header and its data), the
    checksum, padded to 16 bytes. Past the file's end if the file is short."""
    position = offset + 8
    for _ in range(data[offset + 1] if offset + 1 < len(data) else 0):
        if position + 8 > len(data):
            return position + 8 + 16
        length = int.from_bytes(data[position + 4 : position + 8], "little")
        position += 8 + length
    return (position + 16) & ~15


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


def inspect_firmware(
    data: bytes, *, validate_image: bool, signing_keys: dict | None = None
) -> ImageReport:
    if validate_image:
        chip = _check_image(data)
    elif data:
        chip = _detect_chip(data) if data[0] == IMAGE_MAGIC else None
    else:
        raise FirmwareRejected("The file is empty.")
    try:
        signed_by = signer_of(data, chip, signing_keys or {})
    except SigningError as error:
        reason = str(error)
        raise FirmwareRejected(f"{reason[:1].upper()}{reason[1:]}.") from None
    return ImageReport(
        chip=chip, build=read_build(data), signed_by=signed_by, **read_identity(data)
    )
