"""Whether a board may be given an image, and whether it runs it already.

What a device says of itself (its info message: `dev`, `fw-type`, the
firmware version `fw`/`mcu`/`ncp`, `build`) is held against what the image
says (the chip esptool reads from its header, and its own `blnkinf` block:
type, version, build). In this order:

1. **Type.** Where both name a firmware type (`fw-type`, by default the
   Blynk template id), they must match: another product's firmware is
   never offered.
2. **Already current.** Where both name a version, a device on the image's
   version runs it already; otherwise one reporting the image's build does.
3. **Chip.** An ESP8266 image on an ESP32 (or the reverse) does not boot,
   and the updaters flash it anyway. Judged only for the board names the
   Blynk library gives Espressif boards (`BOARD_CHIPS`, from its
   BlynkDetectDevice.h, 0.4 to 1.3.x); a name outside the table is not.
4. **No downgrade.** A device on a newer version than the image's (dotted
   numbers compared numerically, pre-releases ordered as semantic versioning
   orders them), or without versions on a newer build (compared as the
   dates they are), is not offered it unless the rollout allows downgrades.
"""

import functools
import re
from dataclasses import dataclass

__all__ = [
    "BOARD_CHIPS",
    "BoardReport",
    "ImageIdentity",
    "build_date",
    "incompatibility",
    "runs_already",
    "version_key",
]

# Board names (`dev`) the Blynk library reports for Espressif boards, by
# the chip they carry: "esp32" is the whole family (the library's fallback
# for any ESP32 not named more closely), the others one chip each.
BOARD_CHIPS = {
    # ESP8266: a generic board (ESP-01), ESP-12, NodeMCU, SparkFun's Thing, Digistump Oak.
    "ESP8266": "esp8266",
    "ESP-12": "esp8266",
    "NodeMCU": "esp8266",
    "Esp Thing": "esp8266",
    "Esp Thing Dev": "esp8266",
    "Oak": "esp8266",
    # ESP32, the family: the generic name and the boards 0.4-0.6 named.
    "ESP32": "esp32",
    "SweetPeas ESP320": "esp32",
    "ESP32 Nano32": "esp32",
    "LoLin32": "esp32",
    "ESPea32": "esp32",
    "Noduino Quantum": "esp32",
    # ESP32 variants, as 1.0-1.1 (ESP32C3, ESP32S2) and 1.2+ (ESP32-C3, ...) name them.
    "ESP32C3": "esp32c3",
    "ESP32S2": "esp32s2",
    "ESP32-C3": "esp32c3",
    "ESP32-C6": "esp32c6",
    "ESP32-S2": "esp32s2",
    "ESP32-S3": "esp32s3",
}


def _board(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


_CHIP_OF_BOARD = {_board(name): chip for name, chip in BOARD_CHIPS.items()}


@dataclass(frozen=True)
class BoardReport:
    """What a device's last info message said of it."""

    hardware: str | None = None  # dev
    fw_type: str | None = None
    fw_version: str | None = None
    build: str | None = None


@dataclass(frozen=True)
class ImageIdentity:
    """What an image says of itself."""

    chip: str | None = None  # esptool's name: "esp8266", "esp32", "esp32s3", ...
    fw_type: str | None = None
    fw_version: str | None = None
    build: str | None = None

    @classmethod
    def of(cls, source) -> "ImageIdentity":
        """From anything that names them: an upload's report, a firmware row, a Candidate."""
        return cls(source.chip, source.fw_type, source.fw_version, source.build)

    # Parsed once per image: a login batch judges every device against it.
    @functools.cached_property
    def version_order(self) -> tuple | None:
        return version_key(self.fw_version) if self.fw_version else None

    @functools.cached_property
    def build_order(self) -> tuple | None:
        return build_date(self.build)


def runs_already(board: BoardReport, image: ImageIdentity) -> bool:
    """The device runs this image's firmware: the same version, or the same build."""
    if board.fw_version and image.fw_version:
        return version_key(board.fw_version) == image.version_order
    return image.build is not None and board.build == image.build


def incompatibility(
    board: BoardReport, image: ImageIdentity, *, allow_downgrade: bool = False
) -> str | None:
    """Why the device may not be given the image; None if it may (or runs it already)."""
    if board.fw_type and image.fw_type and board.fw_type != image.fw_type:
        return f"firmware type {image.fw_type[:64]}, the device reports {board.fw_type[:64]}"
    if runs_already(board, image):
        return None
    unfit = _chip_misfit(board.hardware, image.chip)
    if unfit is not None or allow_downgrade:
        return unfit
    if board.fw_version and image.fw_version:
        if version_key(board.fw_version) > image.version_order:
            return f"would downgrade {board.fw_version[:64]} to {image.fw_version[:64]}"
        return None
    image_date = image.build_order
    if image_date is None:
        return None
    device_date = build_date(board.build)
    if device_date is not None and device_date > image_date:
        return f"would downgrade build {board.build} to {image.build}"
    return None


# A fleet reports a handful of board names and builds, judged at every login
# and every offer: each is read once (the caches are bounded, and C-fast to ask).
@functools.lru_cache(maxsize=1024)
def _chip_of_board(reported_dev: str) -> str | None:
    return _CHIP_OF_BOARD.get(_board(reported_dev))


def _chip_misfit(reported_dev: str | None, chip: str | None) -> str | None:
    if not reported_dev or not chip:
        return None
    board_chip = _chip_of_board(reported_dev)
    if board_chip is None:
        return None  # not a name the library gives an Espressif board
    # "esp32" is the family: any of its chips may be on the board.
    if chip.startswith("esp32") if board_chip == "esp32" else chip == board_chip:
        return None
    return f"the image is for {chip.upper()}, the device reports dev={reported_dev[:32]}"


# --- ordering versions and builds -------------------------------------------------

_NUMBERS = re.compile(r"v?(\d+(?:\.\d+)*)")


def version_key(version: str) -> tuple:
    """A key that orders versions as semantic versioning does, for any number
    of dotted parts: 1.2 == 1.2.0 < 1.10.0; 1.0.0-alpha < 1.0.0-alpha.1 <
    1.0.0-beta < 1.0.0-rc.1 < 1.0.0; build metadata (+...) is ignored. A
    version that does not start with numbers orders before every one that
    does, and equals only itself."""
    text = version.strip().split("+", 1)[0]
    match = _NUMBERS.match(text)
    if match is None:
        return ((), 0, ((1, 0, text),))
    numbers = [int(part) for part in match.group(1).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()  # 1.2.0 == 1.2
    rest = text[match.end() :].lstrip("-.")
    if not rest:
        return (tuple(numbers), 1, ())  # a release: after all of its pre-releases
    identifiers = tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in rest.split(".")
    )
    return (tuple(numbers), 0, identifiers)


_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


@functools.lru_cache(maxsize=1024)
def build_date(build: str | None) -> tuple[int, ...] | None:
    """`__DATE__ __TIME__` ("Aug 14 2017 20:31:49", single-digit days padded
    with a space) as (year, month, day, hour, minute, second), which orders
    as time does; None for anything else. Read by hand, not by strptime:
    every login of a campaign asks."""
    parts = build.split() if build else ()
    if len(parts) != 4 or parts[0] not in _MONTHS:
        return None
    numbers = (parts[2], parts[1], *parts[3].split(":"))
    if len(numbers) != 5 or not all(part.isascii() and part.isdigit() for part in numbers):
        return None
    year, day, hour, minute, second = map(int, numbers)
    return (year, _MONTHS[parts[0]], day, hour, minute, second)
