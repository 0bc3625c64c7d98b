"""Which rollout applies to a device, and when it is offered.

The most specific active rollout wins: device > project > user > all devices.
The Blynk server checks "all devices" first, so a user-level and an
all-devices update ping-pong a board between two builds; here a device only
ever looks at the one rollout that targets it most closely.
"""

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from ..store import Device, Firmware, Project, Rollout, RolloutScope, RolloutState, utcnow

__all__ = ["RolloutPlanner"]

_TARGET_COLUMN = {
    RolloutScope.DEVICE: Rollout.device_id,
    RolloutScope.PROJECT: Rollout.project_id,
    RolloutScope.USER: Rollout.user_id,
}


class RolloutPlanner:
    def rollout_for(self, session: Session, device: Device) -> Rollout | None:
        project = session.get(Project, device.project_id)
        candidates = session.scalars(
            select(Rollout).where(
                Rollout.state == RolloutState.ACTIVE,
                or_(
                    and_(Rollout.scope == RolloutScope.DEVICE, Rollout.device_id == device.id),
                    and_(
                        Rollout.scope == RolloutScope.PROJECT,
                        Rollout.project_id == device.project_id,
                    ),
                    and_(Rollout.scope == RolloutScope.USER, Rollout.user_id == project.user_id),
                    Rollout.scope == RolloutScope.ALL,
                ),
            )
        ).all()
        return min(
            candidates,
            key=lambda rollout: (RolloutScope.BY_PRECEDENCE.index(rollout.scope), -rollout.id),
            default=None,
        )

    @staticmethod
    def should_offer(rollout: Rollout, device: Device) -> bool:
        target = rollout.firmware.build
        if rollout.scope == RolloutScope.DEVICE:
            # Asked for by name: offered unless the device already runs that build.
            return target is None or device.build != target
        # A campaign can only judge devices that report a build: one that
        # reports none could never be seen as updated, and would loop.
        return bool(device.build) and device.build != target

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
