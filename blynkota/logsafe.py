"""What may reach the log from outside, and in what form.

- A device token is a password: the log shows a tag instead, the first
  hex digits of its SHA-256, enough to tell devices apart and to find one
  (`flask devices list` shows each device's tag), useless to log in with.
- Lines a client can cause at will (a bad request) have a budget per
  second; past it they are counted, and the count is logged with the next
  line, so a flood of bad requests cannot flood the log.
- So do the lines of one device (its logins, its closes, its offers): a
  device that reconnects in a loop has DEVICE_LINES a minute; past them its
  lines are counted, and one line a minute names the devices over budget
  with their counts (`DeviceLines`).
- A value cut to its column (a device's 40-character `ver` in a column of
  32) is never cut silently: counted by key in /metrics, and logged once per
  device and key at DEBUG (`CutValues`).
- Text a client chose (a request line, a token that was refused) is cut
  to a length and its control bytes escaped, so it cannot forge log lines
  or send escape sequences to an operator's terminal.
- The access log shows the path of a request without its query string:
  `?token=` there is a device's token (http_handler.py).
"""

import hashlib
import logging
import time
from collections.abc import Callable

import gevent

from .metrics import DEVICE_LINES_DROPPED, VALUES_CUT

__all__ = [
    "CUT_VALUES",
    "CountsPerInterval",
    "CutValues",
    "DEVICE_LINES",
    "DeviceLines",
    "LogBudget",
    "device_line",
    "printable",
    "token_tag",
]

log = logging.getLogger("blynkota.log")

TAG_DIGITS = 10


def token_tag(token: str) -> str:
    """`t:` and the first hex digits of the token's SHA-256 ('-' for none)."""
    if not token:
        return "-"
    return "t:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:TAG_DIGITS]


def printable(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, anything unprintable escaped (\\x1b, \\r, ...)."""
    cut = text[:limit]
    if cut.isprintable():
        return cut + ("..." if len(text) > limit else "")
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return escaped + ("..." if len(text) > limit else "")


class LogBudget:
    """At most `per_second` lines a second; the rest counted, and reported after."""

    def __init__(self, per_second: int = 20) -> None:
        self.per_second = per_second
        self._second = 0
        self._used = 0
        self._dropped = 0

    def take(self) -> tuple[bool, int]:
        """(may this line be logged, how many were dropped since the last one logged)."""
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._used = second, 0
        if self._used >= self.per_second:
            self._dropped += 1
            return False, 0
        self._used += 1
        dropped, self._dropped = self._dropped, 0
        return True, dropped


class CountsPerInterval:
    """Counts by key, told in one log line when `interval` ends (or at
    `summarise()`, as at the stop), instead of a line for each: for what a
    flood can cause at will. `tell(counts)` writes that line."""

    def __init__(self, interval: float, tell: Callable[[dict[str, int]], None]) -> None:
        self.interval = interval
        self._tell = tell
        self._started = time.monotonic()
        self._counts: dict[str, int] = {}
        self._timer: gevent.Greenlet | None = None

    def add(self, key: str) -> None:
        self.roll_if_due()
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._timer is None:
            # Told when the interval ends, even if nothing more comes.
            left = self.interval - (time.monotonic() - self._started)
            self._timer = gevent.spawn_later(max(left, 0.0), self.summarise)

    def roll_if_due(self) -> bool:
        """Tell the interval that ended, if it has; True if a new one began."""
        if time.monotonic() - self._started < self.interval:
            return False
        self.summarise()
        return True

    def summarise(self) -> None:
        counts, self._counts = self._counts, {}
        self._started = time.monotonic()
        timer, self._timer = self._timer, None
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        if counts:
            self._tell(counts)


class DeviceLines:
    """At most `per_device` lines of each device every `interval` seconds.

    Past it a device's lines are counted, not logged; when the interval
    ends, one line names the devices over budget (the most talkative
    first) and how many of their lines were left out. Memory: a count per
    device that logged in the current interval.
    """

    SHOWN = 5  # devices named in the summary line

    def __init__(self, per_device: int = 10, interval: float = 60.0) -> None:
        self.per_device = per_device
        self._used: dict[str, int] = {}
        self._dropped = CountsPerInterval(interval, self._tell)

    def take(self, tag: str) -> bool:
        """May a line about device `tag` be logged now. A connection not logged
        in (tag "-") is no device of ours: its lines are not counted here."""
        if tag == "-":
            return True
        if self._dropped.roll_if_due():
            self._used.clear()
        used = self._used.get(tag, 0)
        if used < self.per_device:
            self._used[tag] = used + 1
            return True
        self._dropped.add(tag)
        DEVICE_LINES_DROPPED.inc()
        return False

    def summarise(self) -> None:
        self._dropped.summarise()
        self._used.clear()

    def _tell(self, dropped: dict[str, int]) -> None:
        self._used.clear()
        loudest = sorted(dropped.items(), key=lambda item: -item[1])[: self.SHOWN]
        shown = ", ".join(f"{tag} {count}" for tag, count in loudest)
        more = f" and {len(dropped) - len(loudest)} more" if len(dropped) > len(loudest) else ""
        log.warning(
            "%d line(s) of %d device(s) left out in the last %g s (over %d a device): %s%s",
            sum(dropped.values()),
            len(dropped),
            self._dropped.interval,
            self.per_device,
            shown,
            more,
        )


DEVICE_LINES = DeviceLines()


def device_line(logger: logging.Logger, level: int, tag: str, peer: str, text: str, *args) -> None:
    """A line about one device, within its budget (DEVICE_LINES). It names its
    device itself: it may be written from another greenlet, or from the loop."""
    if logger.isEnabledFor(level) and DEVICE_LINES.take(tag):
        logger.log(level, "device %s %s: " + text, tag, peer, *args, extra={"device": tag})


class CutValues:
    """Values cut to the length of their column: each counted (by key), and
    logged once per holder (a device's tag, an upload) and key at DEBUG.

    The holders remembered are those whose values were too long: a handful
    in a sane fleet. Past LIMIT of them the memory starts again (a line may
    then come twice, never once per message)."""

    LIMIT = 100_000

    def __init__(self) -> None:
        self._told: set[tuple[str, str]] = set()

    def cut(self, value: str, limit: int, *, key: str, holder: str) -> str:
        if len(value) <= limit:
            return value
        VALUES_CUT.labels(key).inc()
        if (holder, key) not in self._told:
            if len(self._told) >= self.LIMIT:
                self._told.clear()
            self._told.add((holder, key))
            log.debug(
                "%s: %s cut to its column's %d characters (it had %d): %s",
                holder,
                key,
                limit,
                len(value),
                printable(value[:limit]),
            )
        return value[:limit]


CUT_VALUES = CutValues()
