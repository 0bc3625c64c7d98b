"""Numbers from outside (device info messages, admin query strings and paths),
parsed one way: ASCII digits only, within a range the caller names.

Python's `str.isdigit` and `int` accept more than a client means: `²`, Arabic
digits, spaces, `_`, 400-digit numbers the database cannot hold. Each of those
is no number here, and the caller says so (a 400 naming the parameter, or an
ignored info field).
"""

import re

__all__ = ["ROW_ID_MAX", "fraction", "in_words", "seconds", "whole_number"]

ROW_ID_MAX = 2**31 - 1  # an INTEGER primary key, on MySQL as on SQLite
_DIGITS = re.compile(r"[0-9]{1,19}")  # [0-9] is ASCII only; 19 digits cover 64 bits
_DURATION = re.compile(r"([0-9]{1,9})([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_FRACTION = re.compile(r"0(\.[0-9]{1,6})?|1(\.0{1,6})?|\.[0-9]{1,6}")


def whole_number(text: str | None, *, low: int = 0, high: int = 2**63 - 1) -> int | None:
    """`text` as an integer from `low` to `high`, or None if it is anything else."""
    if text is None or not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if low <= value <= high else None


def seconds(text: str | None, *, low: int, high: int) -> int | None:
    """A duration, `90`, `90s`, `15m`, `24h` or `7d`, in seconds from `low` to
    `high`; None if it is anything else."""
    match = _DURATION.fullmatch(text or "")
    if match is None:
        return None
    value = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value if low <= value <= high else None


def in_words(seconds: float) -> str:
    """A span of seconds as an operator reads it: "40 s", "4 min", "2 h 5 min"."""
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def fraction(text: str | None) -> float | None:
    """A share from 0 to 1 written as a plain decimal (`0.2`, `.25`, `1`); None otherwise."""
    if text is None or not _FRACTION.fullmatch(text):
        return None
    return float(text)
