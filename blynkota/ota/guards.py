"""Fleet-safe rollouts: download slots, the failure threshold, waves that grow by themselves.

Every decision lands in the database (a device holding a slot is a row in
`offered`/`downloading`; a pause or a new wave is a rollout event), so a
restart continues exactly where the rollout was. Slots are counted while the
offer-slots row is locked (cluster/leases.py), so the count holds across
processes.
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..store import DeviceState, Rollout, RolloutDevice, RolloutState
from .cohorts import parse_waves
from .rollouts import RolloutPlanner

__all__ = ["FleetPolicy", "RolloutGuards"]

# Holding a download slot: offered and not yet done downloading.
SLOT_STATES = (DeviceState.OFFERED, DeviceState.DOWNLOADING)


@dataclass(frozen=True)
class FleetPolicy:
    max_concurrent: int = 50  # devices offered/downloading at once, per rollout and in all
    push_online: bool = False  # default of now=
    wave_min_devices: int = 10  # finished devices a wave needs before the next one
    abort_failure_ratio: float = 0.2  # failed / finished above this pauses the rollout
    abort_min_devices: int = 10  # finished devices before the ratio is judged


class RolloutGuards:
    def __init__(self, policy: FleetPolicy, planner: RolloutPlanner) -> None:
        self.policy = policy
        self.planner = planner

    def free_slots(self, session: Session, rollout_id: int | None = None) -> int:
        """Download slots free server-wide, and in `rollout_id` when given."""
        in_flight = select(func.count(RolloutDevice.id)).where(RolloutDevice.state.in_(SLOT_STATES))
        limit = self.policy.max_concurrent
        free = limit - session.scalar(in_flight)
        if rollout_id is not None:
            mine = session.scalar(in_flight.where(RolloutDevice.rollout_id == rollout_id))
            free = min(free, limit - mine)
        return max(0, free)

    @staticmethod
    def _finished(
        session: Session,
        rollout_id: int,
        buckets: range | None = None,
        since: datetime | None = None,
    ) -> tuple[int, int]:
        """(updated, failed) among devices that went through an update (not already current)."""
        query = (
            select(RolloutDevice.state, func.count(RolloutDevice.id))
            .where(
                RolloutDevice.rollout_id == rollout_id,
                RolloutDevice.state.in_((DeviceState.UPDATED, DeviceState.FAILED)),
                RolloutDevice.already_current.is_(False),
            )
            .group_by(RolloutDevice.state)
        )
        if since is not None:
            query = query.where(
                func.coalesce(RolloutDevice.updated_at, RolloutDevice.failed_at) > since
            )
        if buckets is not None:
            query = query.where(
                RolloutDevice.cohort_bucket >= buckets.start,
                RolloutDevice.cohort_bucket < buckets.stop,
            )
        counts = dict(session.execute(query).all())
        return counts.get(DeviceState.UPDATED, 0), counts.get(DeviceState.FAILED, 0)

    def check_health(self, session: Session, rollout: Rollout) -> bool:
        """Pause an active rollout whose failure ratio passed the threshold; True if it did."""
        if rollout.state != RolloutState.ACTIVE:
            return False
        # After a resume, only what finished since counts: the operator saw the rest.
        updated, failed = self._finished(session, rollout.id, since=rollout.resumed_at)
        finished = updated + failed
        if finished < self.policy.abort_min_devices or finished == 0:
            return False
        ratio = failed / finished
        if ratio <= self.policy.abort_failure_ratio:
            return False
        reason = (
            f"failure ratio {ratio:.2f} ({failed} of {finished} finished devices failed) "
            f"is above ota.abort.failure.ratio {self.policy.abort_failure_ratio:g}"
        )
        return self.planner.pause(session, rollout, reason)

    def advance_wave(self, session: Session, rollout: Rollout) -> bool:
        """Grow an active rollout to its next wave when the current one did well enough."""
        if rollout.state != RolloutState.ACTIVE or not rollout.waves:
            return False
        waves = parse_waves(rollout.waves)
        following = [share for share in waves if share > rollout.percent]
        if not following:
            return False
        # The current wave: the devices the latest widening let in.
        previous = max((share for share in waves if share < rollout.percent), default=0)
        current = range(previous, rollout.percent)
        updated, failed = self._finished(session, rollout.id, current)
        finished = updated + failed
        if finished < self.policy.wave_min_devices:
            return False
        success = 100 * updated / finished
        needed = rollout.success_percent if rollout.success_percent is not None else 100
        if success < needed:
            return False
        why = f"wave reached {success:.0f}% updated of {finished} finished (needs {needed}%)"
        return self.planner.widen(session, rollout, following[0], why)
