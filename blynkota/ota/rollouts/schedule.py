"""When a rollout runs: a start time (startAt=) and a daily offer window (window=, tz=).

A scheduled rollout is a row in state `scheduled` with its `start_at`; the
sweep of whichever node holds the sweeper lease starts it once that time has
come (a conditional UPDATE: once, whatever the number of nodes). A window
only gates offers: an `ota` goes out inside it, a download begun inside may
finish after it closes. Windows are wall-clock times of a named zone, so they
follow its daylight saving time; one that ends before it starts runs across
midnight (22:00-04:00).
"""

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select
from sqlalchemy.orm import Session

from ...store import HotQuery, Rollout, RolloutState

__all__ = [
    "OfferWindow",
    "ScheduleError",
    "closed_rollouts",
    "parse_start_at",
    "parse_window",
    "server_zone",
    "window_of",
    "zone",
]

_WINDOW = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])")
LONGEST_WAIT = timedelta(days=366)  # the latest startAt accepted


class ScheduleError(ValueError):
    """A startAt, window or tz that cannot be used; the message says why."""


def server_zone() -> str:
    """The IANA name of this machine's time zone (TZ, else /etc/localtime), else UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    localtime = Path("/etc/localtime")
    if localtime.is_symlink():
        candidates.append(str(localtime.resolve()).split("zoneinfo/", 1)[-1])
    for name in candidates:
        if name and _zone(name) is not None:
            return name
    return "UTC"


def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def zone(name: str | None) -> str:
    """A tz= value checked: an IANA zone name (Europe/Berlin, UTC)."""
    if name is None:
        return server_zone()
    if len(name) > 64 or _zone(name) is None:
        raise ScheduleError(f"tz must be an IANA time zone (Europe/Berlin, UTC), not {name!r}.")
    return name


def parse_window(text: str) -> tuple[int, int]:
    """`02:00-05:00` as (120, 300), minutes of the day."""
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise ScheduleError(f"window must be HH:MM-HH:MM (02:00-05:00), not {text!r}.")
    hour, minute, end_hour, end_minute = map(int, match.groups())
    start, end = hour * 60 + minute, end_hour * 60 + end_minute
    if start == end:
        raise ScheduleError("window must not start when it ends: leave it out to offer all day.")
    return start, end


def parse_start_at(text: str, tz: str, now: datetime) -> datetime:
    """An ISO 8601 time (`2026-12-24T02:00:00+01:00`, `…Z`, or without an offset:
    in `tz`) as naive UTC, in the future and within a year."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ScheduleError(
            f"startAt must be an ISO 8601 time (2026-12-24T02:00:00+01:00), not {text[:40]!r}."
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(tz))
    moment = moment.astimezone(UTC).replace(tzinfo=None)
    if moment <= now:
        raise ScheduleError(f"startAt {text} has passed: leave it out to start now.")
    if moment > now + LONGEST_WAIT:
        raise ScheduleError("startAt must be within a year.")
    return moment


@dataclass(frozen=True)
class OfferWindow:
    """A daily window of offers: minutes of the day in a zone."""

    start: int
    end: int
    tz: str

    @property
    def text(self) -> str:
        def hhmm(minutes: int) -> str:
            return f"{minutes // 60:02d}:{minutes % 60:02d}"

        return f"{hhmm(self.start)}-{hhmm(self.end)} {self.tz}"

    def _local(self, now: datetime) -> datetime:
        return now.replace(tzinfo=UTC).astimezone(ZoneInfo(self.tz))

    def contains(self, now: datetime) -> bool:
        """Whether `now` (naive UTC) is inside the window."""
        local = self._local(now)
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # across midnight

    def opens_at(self, now: datetime) -> datetime:
        """When the window next opens after `now` (both naive UTC)."""
        local = self._local(now)
        opening = local.replace(hour=self.start // 60, minute=self.start % 60, second=0,
                                microsecond=0)  # fmt: skip
        if opening <= local:
            opening += timedelta(days=1)
        return opening.astimezone(UTC).replace(tzinfo=None)

    def outlook(self, now: datetime) -> str:
        """The window in words, for the status: open now, or when it opens."""
        if self.contains(now):
            return f"offers inside {self.text}: open now"
        return f"offers inside {self.text}: opens at {self.opens_at(now):%Y-%m-%d %H:%M} UTC"


def window_of(start: int | None, end: int | None, tz: str | None) -> OfferWindow | None:
    """A rollout's window from its columns, or None (it offers all day)."""
    if start is None or end is None:
        return None
    return OfferWindow(start, end, tz or "UTC")


_WINDOWED = HotQuery(
    select(Rollout.id, Rollout.window_start, Rollout.window_end, Rollout.window_tz).where(
        Rollout.state == RolloutState.ACTIVE, Rollout.window_start.is_not(None)
    )
)


def closed_rollouts(session: Session, now: datetime) -> list[int]:
    """Active rollouts outside their offer window now: their pending devices
    wait, and the fill does not pick them (nor let them crowd out the rest)."""
    return [
        rollout_id
        for rollout_id, *window in _WINDOWED.rows(session)
        if not window_of(*window).contains(now)
    ]
