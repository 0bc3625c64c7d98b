"""Which rollout applies to a device, and when it is offered.

The most specific active rollout wins: device > project > user > all devices.
The Blynk server checks "all devices" first, so a user-level and an
all-devices update ping-pong a board between two builds; here a device only
ever looks at the one rollout that targets it most closely.
"""

from dataclasses import dataclass

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from ..store import Firmware, Rollout, RolloutScope, RolloutState, utcnow

__all__ = ["Candidate", "RolloutPlanner"]

_TARGET_COLUMN = {
    RolloutScope.DEVICE: Rollout.device_id,
    RolloutScope.PROJECT: Rollout.project_id,
    RolloutScope.USER: Rollout.user_id,
}

# Built once: this runs at every device login, and building the expression
# costs more than running it.
_ACTIVE_FOR_DEVICE = (
    select(Rollout.id, Rollout.scope, Rollout.firmware_id, Firmware.name, Firmware.build)
    .join(Firmware, Firmware.id == Rollout.firmware_id)
    .where(
        Rollout.state == RolloutState.ACTIVE,
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


class RolloutPlanner:
    def rollout_for(
        self, session: Session, *, device_id: int, project_id: int, user_id: int
    ) -> Candidate | None:
        rows = session.execute(
            _ACTIVE_FOR_DEVICE, {"device": device_id, "project": project_id, "user": user_id}
        ).all()
        best = min(
            rows,
            key=lambda row: (RolloutScope.BY_PRECEDENCE.index(row.scope), -row.id),
            default=None,
        )
        return None if best is None else Candidate(*best)

    @staticmethod
    def should_offer(candidate: Candidate, reported_build: str | None) -> bool:
        if candidate.scope == RolloutScope.DEVICE:
            # Asked for by name: offered unless the device already runs that build.
            return candidate.build is None or reported_build != candidate.build
        # A campaign can only judge devices that report a build: one that
        # reports none could never be seen as updated, and would loop.
        return bool(reported_build) and reported_build != candidate.build

    def start(
        self,
        session: Session,
        *,
        scope: str,
        firmware: Firmware,
        started_by: str,
        target_id: int | None = None,
    ) -> Rollout:
        """Create a rollout; the active one for the same scope and target is superseded."""
        rollout = Rollout(scope=scope, firmware_id=firmware.id, started_by=started_by)
        if scope in _TARGET_COLUMN:
            setattr(rollout, _TARGET_COLUMN[scope].key, target_id)
        rollout.firmware = firmware
        session.add(rollout)
        session.flush()
        same_target = [Rollout.scope == scope, Rollout.state == RolloutState.ACTIVE]
        if scope in _TARGET_COLUMN:
            same_target.append(_TARGET_COLUMN[scope] == target_id)
        session.execute(
            update(Rollout)
            .where(*same_target, Rollout.id != rollout.id)
            .values(
                state=RolloutState.SUPERSEDED,
                superseded_by_id=rollout.id,
                stopped_at=utcnow(),
                stopped_by=started_by,
            )
        )
        return rollout

    def stop_all(self, session: Session, stopped_by: str) -> int:
        result = session.execute(
            update(Rollout)
            .where(Rollout.state == RolloutState.ACTIVE)
            .values(state=RolloutState.STOPPED, stopped_at=utcnow(), stopped_by=stopped_by)
        )
        return result.rowcount
