"""Who takes part in a partial rollout: a stable share of devices, chosen by hash.

A device's bucket (0-99) is a hash of the rollout's seed and its token, so the
same devices are chosen on every server and after every restart, and a wider
percentage always includes the narrower one (canary devices stay in).
"""

import hashlib
from dataclasses import dataclass
from datetime import datetime

from ...numbers import whole_number

__all__ = ["Controls", "ControlsError", "bucket", "parse_waves", "wave_of"]


class ControlsError(ValueError):
    """A rollout control out of range; the message says which and why."""


def bucket(seed: str, token: str) -> int:
    digest = hashlib.sha256(f"{seed}:{token}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def parse_waves(text: str) -> tuple[int, ...]:
    waves = tuple(whole_number(part.strip(), low=1, high=100) for part in text.split(","))
    if not waves or None in waves:
        raise ControlsError(f"waves must be percentages from 1 to 100 (10,50,100), not {text!r}.")
    if list(waves) != sorted(set(waves)):
        raise ControlsError("waves must grow: 10,50,100.")
    return waves


def wave_of(waves: tuple[int, ...], device_bucket: int) -> int:
    """1 for the first wave's devices, 2 for those the second adds, ..."""
    return next((i for i, share in enumerate(waves, 1) if device_bucket < share), len(waves))


@dataclass(frozen=True)
class Controls:
    """The fleet controls of one `ota/start` (query parameters, stored with the rollout)."""

    push_online: bool | None = None  # None: the ota.push.online default
    percent: int | None = None
    waves: tuple[int, ...] = ()
    success_percent: int | None = None
    dry_run: bool = False
    # This rollout's own limits; None: the server's setting, read when used.
    max_concurrent: int | None = None  # ota.max.concurrent
    attempt_timeout: int | None = None  # seconds, ota.attempt.timeout
    max_attempts: int | None = None  # ota.max.attempts
    abort_ratio: float | None = None  # ota.abort.failure.ratio
    wave_delay: int | None = None  # seconds a wave runs at least before the next opens
    health_window: int | None = None  # seconds, ota.health.window (0: none)
    start_at: datetime | None = None  # naive UTC: created scheduled, started then
    window: tuple[int, int] | None = None  # minutes of the day: offers only inside
    window_tz: str | None = None  # the window's zone (IANA), with window
    tag: str | None = None  # only the devices of the target carrying this tag
    allow_downgrade: bool = False  # devices on a newer version or build are offered it too

    def __post_init__(self) -> None:
        if self.percent is not None and not 1 <= self.percent <= 100:
            raise ControlsError("percent must be from 1 to 100.")
        if self.waves and self.percent is not None:
            raise ControlsError("Give percent or waves, not both: waves start at their first.")
        if self.success_percent is not None and not 1 <= self.success_percent <= 100:
            raise ControlsError("success must be a percentage from 1 to 100.")
        if self.success_percent is not None and not self.waves:
            raise ControlsError("success needs waves: it is the share that grows a wave.")
        if self.wave_delay is not None and not self.waves:
            raise ControlsError("waveDelay needs waves: it is the time between two waves.")

    @property
    def start_percent(self) -> int:
        if self.waves:
            return self.waves[0]
        return 100 if self.percent is None else self.percent
