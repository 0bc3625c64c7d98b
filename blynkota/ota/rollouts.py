"""Which rollout applies to a device, and when it is offered.

The most specific running rollout wins: device > project > user > all
devices; a single-device rollout counts only until its device's row has
ended (updated, failed or cancelled).
The Blynk server checks "all devices" first, so a user-level and an
all-devices update ping-pong a board between two builds; here a device only
ever looks at the one rollout that targets it most closely.
"""

import functools
from dataclasses import dataclass

from sqlalchemy import exists, insert, select, update
from sqlalchemy.orm import Session

from ..store import (
    DeviceState,
    Firmware,
    Rollout,
    RolloutDevice,
    RolloutEvent,
    RolloutScope,
    RolloutState,
    utcnow,
)
from .cohorts import Controls, bucket, parse_waves, wave_of
from .compatibility import BoardReport, ImageIdentity, incompatibility, runs_already
from .lifecycle import UpdateLifecycle

__all__ = ["Candidate", "RolloutPlanner", "RunningRollouts", "running_key", "target_of"]

_TARGET_COLUMN = {
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
    return min(
        rows,
        key=lambda row: (RolloutScope.BY_PRECEDENCE.index(row[1]), -row[0]),
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
        for row in session.execute(_ALL_RUNNING).all():
            if row.scope == RolloutScope.ALL:
                self._everyone.append(row)
            else:
                self._by_target.setdefault((row.scope, target_of(row)), []).append(row)

    def rollout_for(self, *, device_id: int, project_id: int, user_id: int) -> Candidate | None:
        rows = [
            *self._everyone,
            *self._by_target.get((RolloutScope.DEVICE, device_id), ()),
            *self._by_target.get((RolloutScope.PROJECT, project_id), ()),
            *self._by_target.get((RolloutScope.USER, user_id), ()),
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
    column = _TARGET_COLUMN.get(rollout.scope)
    return None if column is None else getattr(rollout, column.key)


def running_key(scope: str, target_id: int | None) -> str:
    """The unique key a running rollout holds for its scope and target."""
    return f"{scope}:{'' if target_id is None else target_id}"


class RolloutPlanner:
    """Rollout-level changes, each a conditional UPDATE on the rollout's state.

    The ORM `Rollout` objects passed in are read, never written: a change
    that another process made first leaves the row alone and answers False.
    """

    def start(
        self,
        session: Session,
        *,
        scope: str,
        firmware: Firmware,
        started_by: str,
        target_id: int | None = None,
        controls: Controls | None = None,
    ) -> Rollout:
        """Create a rollout; the running one for the same scope and target is superseded.

        The unique running key decides between processes starting rollouts for
        one target at the same moment: the second to set it gets a duplicate
        key, and its unit of work runs again (superseding the first).
        """
        now = utcnow()
        controls = controls or Controls()
        rollout = Rollout(
            scope=scope,
            firmware_id=firmware.id,
            started_by=started_by,
            started_at=now,
            push_online=controls.push_online,
            allow_downgrade=controls.allow_downgrade,
            enrol_due_at=now if controls.push_online else None,
            percent=controls.start_percent,
            waves=",".join(map(str, controls.waves)) or None,
            success_percent=controls.success_percent,
            cohort_seed=firmware.sha256[:16],
            max_concurrent=controls.max_concurrent,
            attempt_timeout=controls.attempt_timeout,
            max_attempts=controls.max_attempts,
            abort_ratio=controls.abort_ratio,
            wave_delay=controls.wave_delay,
            wave_opened_at=now if controls.waves else None,
        )
        if scope in _TARGET_COLUMN:
            setattr(rollout, _TARGET_COLUMN[scope].key, target_id)
        rollout.firmware = firmware
        session.add(rollout)
        session.flush()
        _log(
            session,
            rollout.id,
            None,
            rollout.state,
            f"started by {started_by}{_describe(controls)}",
            now,
        )
        key = running_key(scope, target_id)
        running = session.execute(
            select(Rollout.id, Rollout.state).where(Rollout.running_key == key).with_for_update()
        ).all()
        for old_id, old_state in running:
            self._end(
                session, old_id, old_state, RolloutState.SUPERSEDED, started_by, now,
                superseded_by_id=rollout.id,
            )  # fmt: skip
        session.execute(
            update(Rollout)
            .where(Rollout.id == rollout.id)
            .values(running_key=key)
            .execution_options(synchronize_session=False)
        )
        return rollout

    def stop(self, session: Session, stopped_by: str, rollout_id: int | None = None) -> int:
        """Stop one rollout, or every running one; returns how many this call stopped."""
        query = select(Rollout.id, Rollout.state).where(Rollout.state.in_(RolloutState.RUNNING))
        if rollout_id is not None:
            query = query.where(Rollout.id == rollout_id)
        now = utcnow()
        return sum(
            self._end(session, found_id, state, RolloutState.STOPPED, stopped_by, now)
            for found_id, state in session.execute(query.with_for_update()).all()
        )

    @staticmethod
    def pause(session: Session, rollout: Rollout, reason: str) -> bool:
        return _change_state(
            session,
            rollout.id,
            RolloutState.ACTIVE,
            RolloutState.PAUSED,
            f"paused: {reason}",
            pause_reason=reason[:255],
        )

    @staticmethod
    def resume(session: Session, rollout: Rollout, by: str) -> bool:
        return _change_state(
            session,
            rollout.id,
            RolloutState.PAUSED,
            RolloutState.ACTIVE,
            f"resumed by {by}",
            pause_reason=None,
            resumed_at=utcnow(),
        )

    @staticmethod
    def widen(session: Session, rollout: Rollout, percent: int, why: str) -> bool:
        """Let more devices in, if the rollout still has the share it was judged at."""
        before = rollout.percent
        result = session.execute(
            update(Rollout)
            .where(
                Rollout.id == rollout.id,
                Rollout.percent == before,
                Rollout.state.in_(RolloutState.RUNNING),
            )
            .values(
                percent=percent,
                wave_opened_at=utcnow(),
                **({"enrol_due_at": utcnow()} if rollout.push_online else {}),
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            return False
        state = session.scalar(select(Rollout.state).where(Rollout.id == rollout.id))
        _log(
            session,
            rollout.id,
            state,
            state,
            f"{why}: {before}% -> {percent}% of devices",
            utcnow(),
        )
        return True

    @staticmethod
    def _end(
        session: Session, rollout_id: int, before: str, state: str, by: str, now, **values
    ) -> bool:
        result = session.execute(
            update(Rollout)
            .where(Rollout.id == rollout_id, Rollout.state == before)
            .values(state=state, stopped_at=now, stopped_by=by[:255], running_key=None, **values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            return False
        detail = f"{state} by {by}"
        _log(session, rollout_id, before, state, detail, now)
        device_state = (
            DeviceState.SUPERSEDED if state == RolloutState.SUPERSEDED else DeviceState.CANCELLED
        )
        UpdateLifecycle.end_rollout(session, rollout_id, device_state, now, detail)
        return True


def _change_state(
    session: Session, rollout_id: int, before: str, after: str, detail: str, **values
) -> bool:
    result = session.execute(
        update(Rollout)
        .where(Rollout.id == rollout_id, Rollout.state == before)
        .values(state=after, **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    _log(session, rollout_id, before, after, detail, utcnow())
    return True


def _describe(controls: Controls) -> str:
    parts = []
    if controls.push_online:
        parts.append("now=true")
    if controls.waves:
        parts.append(f"waves={','.join(map(str, controls.waves))}")
        if controls.success_percent is not None:
            parts.append(f"success={controls.success_percent}")
    elif controls.percent is not None:
        parts.append(f"percent={controls.percent}")
    for name, value in (
        ("maxConcurrent", controls.max_concurrent),
        ("attemptTimeout", controls.attempt_timeout),
        ("maxAttempts", controls.max_attempts),
        ("abortRatio", controls.abort_ratio),
        ("waveDelay", controls.wave_delay),
    ):
        if value is not None:
            parts.append(f"{name}={value:g}")
    return f" ({', '.join(parts)})" if parts else ""


def _log(session: Session, rollout_id: int, before: str | None, after: str, detail: str, now):
    """A rollout-level entry in the event log (no device)."""
    session.execute(
        insert(RolloutEvent).values(
            rollout_id=rollout_id,
            device_id=None,
            from_state=before,
            to_state=after,
            at=now,
            detail=detail[:255],
        )
    )
