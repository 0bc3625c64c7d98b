"""Which rollout applies to a device, and what deciding its offer needs.

The most specific running rollout wins: device > project > user > all
devices; a single-device rollout counts only until its device's row has
ended (updated, failed or cancelled).
The Blynk server checks "all devices" first, so a user-level and an
all-devices update ping-pong a board between two builds; here a device only
ever looks at the one rollout that targets it most closely.
"""

import functools
from dataclasses import dataclass

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from ...store import DeviceState, Firmware, Rollout, RolloutDevice, RolloutScope, RolloutState
from .cohorts import bucket, parse_waves, wave_of
from .compatibility import BoardReport, ImageIdentity, incompatibility, runs_already
from .schedule import OfferWindow, window_of

__all__ = [
    "TARGET_COLUMN",
    "Candidate",
    "RunningRollouts",
    "candidate_of",
    "running_key",
    "target_of",
]

TARGET_COLUMN = {
    RolloutScope.DEVICE: Rollout.device_id,
    RolloutScope.PROJECT: Rollout.project_id,
    RolloutScope.USER: Rollout.user_id,
}

# Built once, on the tables (no ORM compile per run): this runs for every
# batch of logins and offers, and building the expression costs more than
# running it.
_rollouts, _firmware, _rd = Rollout.__table__, Firmware.__table__, RolloutDevice.__table__
_CANDIDATE_COLUMNS = (
    _rollouts.c.id,
    _rollouts.c.scope,
    _rollouts.c.firmware_id,
    _firmware.c.name,
    _firmware.c.build,
    _rollouts.c.state,
    _rollouts.c.percent,
    _rollouts.c.cohort_seed,
    _rollouts.c.waves,
    _firmware.c.chip,
    _firmware.c.fw_type,
    _firmware.c.fw_version,
    _rollouts.c.allow_downgrade,
    _rollouts.c.health_window,
    _rollouts.c.window_start,
    _rollouts.c.window_end,
    _rollouts.c.window_tz,
    _rollouts.c.tag,
)
_ALL_RUNNING = (
    select(
        *_CANDIDATE_COLUMNS,
        _rollouts.c.device_id,
        _rollouts.c.project_id,
        _rollouts.c.user_id,
    )
    .join(_firmware, _firmware.c.id == _rollouts.c.firmware_id)
    # A paused rollout still owns its devices: they must not fall back to a
    # less specific rollout while it is paused.
    .where(
        _rollouts.c.state.in_(RolloutState.RUNNING),
        # A single-device rollout lets its device go once the device's row
        # has ended (updated, failed, cancelled): a later campaign reaches it.
        ~exists().where(
            _rd.c.rollout_id == _rollouts.c.id,
            _rd.c.device_id == _rollouts.c.device_id,
            _rd.c.state.in_(DeviceState.ENDED),
        ),
    )
)


@dataclass(frozen=True)
class Candidate:
    """The rollout that applies to a device, with what deciding an offer needs."""

    rollout_id: int
    scope: str
    firmware_id: int
    firmware_name: str
    build: str | None
    state: str = RolloutState.ACTIVE
    percent: int = 100
    cohort_seed: str = ""
    waves: str | None = None
    chip: str | None = None  # what the image was built for (esptool's name)
    fw_type: str | None = None  # what the image's blnkinf block says
    fw_version: str | None = None
    allow_downgrade: bool = False
    health_window: int | None = None  # its own healthWindow=, seconds
    window_start: int | None = None  # window=: minutes of the day, in window_tz
    window_end: int | None = None
    window_tz: str | None = None
    tag: str | None = None  # tag=: only devices carrying it

    @functools.cached_property
    def window(self) -> OfferWindow | None:
        """When it may offer: its daily window, or None (all day)."""
        return window_of(self.window_start, self.window_end, self.window_tz)

    @functools.cached_property  # judged for every device a login batch reports
    def image(self) -> ImageIdentity:
        return ImageIdentity.of(self)

    def runs_on(self, board: BoardReport) -> bool:
        """The device runs this rollout's firmware already (compatibility.py)."""
        return runs_already(board, self.image)

    def unfit_for(self, board: BoardReport) -> str | None:
        """Why the device may not be given this rollout's image (compatibility.py)."""
        return incompatibility(board, self.image, allow_downgrade=self.allow_downgrade)

    def takes_part(self, token: str) -> tuple[bool, int, int | None]:
        """(in the rollout now, the device's bucket, its wave) for a partial rollout."""
        device_bucket = bucket(self.cohort_seed, token)
        wave = wave_of(parse_waves(self.waves), device_bucket) if self.waves else None
        return device_bucket < self.percent, device_bucket, wave

    def may_offer(self, reported_build: str | None) -> bool:
        """Whether a device reporting this build may be offered this rollout at all."""
        if self.scope == RolloutScope.DEVICE:
            # Asked for by name: offered unless the device already runs that build.
            return self.build is None or reported_build != self.build
        # A campaign can only judge devices that report a build: one that
        # reports none could never be seen as updated, and would loop.
        return bool(reported_build) and reported_build != self.build


def _most_specific(rows):
    """The rollout that owns a device: the most specific scope; within a scope a
    tagged rollout before an untagged one; then the newest."""
    return min(
        rows,
        key=lambda row: (RolloutScope.BY_PRECEDENCE.index(row[1]), row.tag is None, -row[0]),
        default=None,
    )


class RunningRollouts:
    """Every running rollout, read once: the precedence of many devices judged in memory.

    Running rollouts are one per scope and target, but single-device ones
    can be many (one per `?token=` update): they are indexed by scope and
    target, so judging a device costs a few dictionary lookups whatever
    their number.
    """

    def __init__(self, session: Session) -> None:
        self._everyone = []
        self._by_target: dict[tuple[str, int], list] = {}
        # One Candidate per rollout, shared by every device it owns: what it
        # parses once (its image's version and build) serves the whole batch.
        self._candidates: dict[int, Candidate] = {}
        # Whether any running rollout aims at a tag: only then are the devices'
        # tags read (fleet/tags.py), one query per batch.
        self.tagged = False
        for row in session.execute(_ALL_RUNNING).all():
            self.tagged = self.tagged or row.tag is not None
            if row.scope == RolloutScope.ALL:
                self._everyone.append(row)
            else:
                self._by_target.setdefault((row.scope, target_of(row)), []).append(row)

    def rollout_for(
        self, *, device_id: int, project_id: int, user_id: int, tags: frozenset = frozenset()
    ) -> Candidate | None:
        """The rollout that owns the device; `tags`, the device's (tags_of): a
        tagged rollout reaches only devices that carry its tag."""
        rows = [
            row
            for row in (
                *self._everyone,
                *self._by_target.get((RolloutScope.DEVICE, device_id), ()),
                *self._by_target.get((RolloutScope.PROJECT, project_id), ()),
                *self._by_target.get((RolloutScope.USER, user_id), ()),
            )
            if row.tag is None or row.tag in tags
        ]
        best = _most_specific(rows)
        if best is None:
            return None
        candidate = self._candidates.get(best[0])
        if candidate is None:
            candidate = self._candidates[best[0]] = Candidate(*best[: len(_CANDIDATE_COLUMNS)])
        return candidate


def target_of(rollout) -> int | None:
    """The id a rollout (or a row with its columns) is aimed at: device, project
    or user; None for all devices."""
    column = TARGET_COLUMN.get(rollout.scope)
    return None if column is None else getattr(rollout, column.key)


def running_key(scope: str, target_id: int | None, tag: str | None = None) -> str:
    """The unique key a running rollout holds for its scope, target and tag."""
    return f"{scope}:{'' if target_id is None else target_id}" + (f"#{tag}" if tag else "")


def candidate_of(rollout: Rollout) -> Candidate:
    """A rollout row (with its firmware) as the Candidate a device is judged by."""
    firmware = rollout.firmware
    return Candidate(
        rollout.id,
        rollout.scope,
        firmware.id,
        firmware.name,
        firmware.build,
        state=rollout.state,
        percent=rollout.percent,
        cohort_seed=rollout.cohort_seed,
        waves=rollout.waves,
        chip=firmware.chip,
        fw_type=firmware.fw_type,
        fw_version=firmware.fw_version,
        allow_downgrade=rollout.allow_downgrade,
        health_window=rollout.health_window,
        window_start=rollout.window_start,
        window_end=rollout.window_end,
        window_tz=rollout.window_tz,
        tag=rollout.tag,
    )
