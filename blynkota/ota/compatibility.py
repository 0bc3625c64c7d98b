"""Whether a board can run an image: the `dev` its info message reports against
the chip the image was built for (read from the image header by esptool).

An ESP8266 image on an ESP32 (or the reverse) does not boot, and the
updaters flash it anyway: such a device is never offered the image. Only what
can be told apart is judged: the Blynk library reports `dev` as "ESP8266" or
"ESP32" (newer ones name the variant, "ESP32-S3"); a plain "ESP32" may be any
variant, and a name that is neither family (a custom board name) or no `dev`
at all is not judged.
"""

import re

__all__ = ["incompatibility"]

_FAMILIES = ("esp8266", "esp32")


def _board(reported: str) -> str:
    return re.sub(r"[^0-9a-z]", "", reported.lower())


def incompatibility(reported_dev: str | None, chip: str | None) -> str | None:
    """Why a device reporting `reported_dev` cannot run an image for `chip`; None if it may."""
    if not reported_dev or not chip:
        return None
    board = _board(reported_dev)
    family = next((name for name in _FAMILIES if board.startswith(name)), None)
    if family is None:
        return None  # not a name we can judge
    image_family = "esp8266" if chip == "esp8266" else "esp32"
    fits = family == image_family and (board in ("esp8266", "esp32") or board == chip)
    if fits:
        return None
    return f"the image is for {chip.upper()}, the device reports dev={reported_dev[:32]}"
