"""Which rollout applies to a device, and when it is offered.

The most specific active rollout wins: device > project > user > all devices.
The Blynk server checks "all devices" first, so a user-level and an
all-devices update ping-pong a board between two builds; here a device only
ever looks at the one rollout that targets it most closely.
"""

from dataclasses import dataclass

from sqlalchemy import and_, bindparam, or_, select
from sqlalchemy.orm import Session

from ..store import DeviceState, Firmware, Rollout, RolloutEvent, RolloutScope, RolloutState, utcnow
from .cohorts import Controls, bucket, parse_waves, wave_of
from .lifecycle import UpdateLifecycle

__all__ = ["Candidate", "RolloutPlanner"]

_TARGET_COLUMN = {
    RolloutScope.DEVICE: Rollout.device_id,
    RolloutScope.PROJECT: Rollout.project_id,
    RolloutScope.USER: Rollout.user_id,
}

# Built once: this runs at every device login, and building the expression
# costs more than running it.
_RUNNING_FOR_DEVICE = (
    select(
        Rollout.id,
        Rollout.scope,
        Rollout.firmware_id,
        Firmware.name,
        Firmware.build,
        Rollout.state,
        Rollout.percent,
        Rollout.cohort_seed,
        Rollout.waves,
    )
    .join(Firmware, Firmware.id == Rollout.firmware_id)
    .where(
        # A paused rollout still owns its devices: they must not fall back to
        # a less specific rollout while it is paused.
        Rollout.state.in_(RolloutState.RUNNING),
        or_(
            and_(Rollout.scope == RolloutScope.DEVICE, Rollout.device_id == bindparam("device")),
            and_(Rollout.scope == RolloutScope.PROJECT, Rollout.project_id == bindparam("project")),
            and_(Rollout.scope == RolloutScope.USER, Rollout.user_id == bindparam("user")),
            Rollout.scope == RolloutScope.ALL,
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


class RolloutPlanner:
    def rollout_for(
        self, session: Session, *, device_id: int, project_id: int, user_id: int
    ) -> Candidate | None:
        rows = session.execute(
            _RUNNING_FOR_DEVICE, {"device": device_id, "project": project_id, "user": user_id}
        ).all()
        best = min(
            rows,
            key=lambda row: (RolloutScope.BY_PRECEDENCE.index(row.scope), -row.id),
            default=None,
        )
        return None if best is None else Candidate(*best)

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
        """Create a rollout; the running one for the same scope and target is superseded."""
        now = utcnow()
        controls = controls or Controls()
        rollout = Rollout(
            scope=scope,
            firmware_id=firmware.id,
            started_by=started_by,
            started_at=now,
            push_online=controls.push_online,
            percent=controls.start_percent,
            waves=",".join(map(str, controls.waves)) or None,
            success_percent=controls.success_percent,
            cohort_seed=firmware.sha256[:16],
        )
        if scope in _TARGET_COLUMN:
            setattr(rollout, _TARGET_COLUMN[scope].key, target_id)
        rollout.firmware = firmware
        session.add(rollout)
        session.flush()
        _log(session, rollout, None, f"started by {started_by}{_describe(controls)}", now)
        same_target = [
            Rollout.scope == scope,
            Rollout.state.in_(RolloutState.RUNNING),
            Rollout.id != rollout.id,
        ]
        if scope in _TARGET_COLUMN:
            same_target.append(_TARGET_COLUMN[scope] == target_id)
        for old in session.scalars(select(Rollout).where(*same_target)).all():
            old.superseded_by_id = rollout.id
            self._end(session, old, RolloutState.SUPERSEDED, started_by, now)
        return rollout

    def stop(self, session: Session, stopped_by: str, rollout_id: int | None = None) -> int:
        """Stop one rollout, or every running one; returns how many were stopped."""
        query = select(Rollout).where(Rollout.state.in_(RolloutState.RUNNING))
        if rollout_id is not None:
            query = query.where(Rollout.id == rollout_id)
        rollouts = session.scalars(query).all()
        now = utcnow()
        for rollout in rollouts:
            self._end(session, rollout, RolloutState.STOPPED, stopped_by, now)
        return len(rollouts)

    @staticmethod
    def pause(session: Session, rollout: Rollout, reason: str) -> bool:
        if rollout.state != RolloutState.ACTIVE:
            return False
        rollout.state, rollout.pause_reason = RolloutState.PAUSED, reason[:255]
        _log(session, rollout, RolloutState.ACTIVE, f"paused: {reason}", utcnow())
        return True

    @staticmethod
    def resume(session: Session, rollout: Rollout, by: str) -> bool:
        if rollout.state != RolloutState.PAUSED:
            return False
        now = utcnow()
        rollout.state, rollout.pause_reason, rollout.resumed_at = RolloutState.ACTIVE, None, now
        _log(session, rollout, RolloutState.PAUSED, f"resumed by {by}", now)
        return True

    @staticmethod
    def widen(session: Session, rollout: Rollout, percent: int, why: str) -> None:
        before = rollout.percent
        rollout.percent = percent
        _log(
            session, rollout, rollout.state, f"{why}: {before}% -> {percent}% of devices", utcnow()
        )

    @staticmethod
    def _end(session: Session, rollout: Rollout, state: str, by: str, now) -> None:
        before = rollout.state
        rollout.state, rollout.stopped_at, rollout.stopped_by = state, now, by[:255]
        detail = f"{state} by {by}"
        _log(session, rollout, before, detail, now)
        device_state = (
            DeviceState.SUPERSEDED if state == RolloutState.SUPERSEDED else DeviceState.CANCELLED
        )
        UpdateLifecycle.end_rollout(session, rollout.id, device_state, now, detail)


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
    return f" ({', '.join(parts)})" if parts else ""


def _log(session: Session, rollout: Rollout, before: str | None, detail: str, now) -> None:
    """A rollout-level entry in the event log (no device)."""
    session.add(
        RolloutEvent(
            rollout_id=rollout.id,
            device_id=None,
            from_state=before,
            to_state=rollout.state,
            at=now,
            detail=detail[:255],
        )
    )
