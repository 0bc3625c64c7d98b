"""Numbers from outside (device info messages, admin query strings and paths),
parsed one way: ASCII digits only, within a range the caller names.

Python's `str.isdigit` and `int` accept more than a client means: `²`, Arabic
digits, spaces, `_`, 400-digit numbers the database cannot hold. Each of those
is no number here, and the caller says so (a 400 naming the parameter, or an
ignored info field).
"""

import re

__all__ = ["ROW_ID_MAX", "whole_number"]

ROW_ID_MAX = 2**31 - 1  # an INTEGER primary key, on MySQL as on SQLite
_DIGITS = re.compile(r"[0-9]{1,19}")  # [0-9] is ASCII only; 19 digits cover 64 bits


def whole_number(text: str | None, *, low: int = 0, high: int = 2**63 - 1) -> int | None:
    """`text` as an integer from `low` to `high`, or None if it is anything else."""
    if text is None or not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if low <= value <= high else None
