"""Fleet-safe rollouts: download slots, the failure threshold, waves that grow by themselves.

Every decision lands in the database (a device holding a slot is a row in
`offered`/`downloading`; a pause or a new wave is a rollout event), so a
restart continues exactly where the rollout was. Slots are counted while the
offer-slots row is locked (cluster/leases.py), so the count holds across
processes.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, case, exists, func, or_, select, true
from sqlalchemy.orm import Session, aliased

from ...store import (
    DeviceState,
    HotQuery,
    Rollout,
    RolloutDevice,
    RolloutScope,
    RolloutState,
    utcnow,
)
from .candidates import target_of
from .cohorts import bucket, parse_waves
from .planner import RolloutPlanner
from .targeting import devices_in_scope, tokens_in_scope

__all__ = ["FleetPolicy", "RolloutGuards", "outcome"]

# A device's end states in a running rollout: it has an outcome.
_OUTCOMES = (DeviceState.UPDATED, DeviceState.FAILED, DeviceState.INCOMPATIBLE)

# Holding a download slot: offered and not yet done downloading.
SLOT_STATES = (DeviceState.OFFERED, DeviceState.DOWNLOADING)
# Every offer counts the slots held, per rollout: one scan of an index (0010).
_SLOTS_HELD = HotQuery(
    select(RolloutDevice.rollout_id, func.count())
    .where(RolloutDevice.state.in_(SLOT_STATES))
    .group_by(RolloutDevice.rollout_id)
)
_OWN_LIMITS = HotQuery(
    select(Rollout.id, Rollout.max_concurrent).where(
        Rollout.id.in_(bindparam("rollouts", expanding=True))
    )
)


@dataclass(frozen=True)
class FleetPolicy:
    max_concurrent: int = 50  # devices offered/downloading at once, per rollout and in all
    push_online: bool = False  # default of now=
    wave_min_devices: int = 10  # finished devices a wave needs before the next one
    abort_failure_ratio: float = 0.2  # failed / finished above this pauses the rollout
    abort_min_devices: int = 10  # devices with an outcome before the ratio is judged

    # A rollout's own limit where it set one (maxConcurrent=, abortRatio=), else these.
    def concurrent_for(self, own: int | None) -> int:
        return self.max_concurrent if own is None else own

    def abort_ratio_for(self, own: float | None) -> float:
        return self.abort_failure_ratio if own is None else own


def outcome(counts) -> str:
    """A rollout's outcome in words, from its devices by state:
    "12 device(s): 10 updated, 2 failed"."""
    ended = sum(counts.get(state) or 0 for state in _OUTCOMES)
    parts = [f"{counts.get(state) or 0} {state}" for state in _OUTCOMES[:2]]
    if counts.get(DeviceState.INCOMPATIBLE):
        parts.append(f"{counts[DeviceState.INCOMPATIBLE]} incompatible")
    return f"{ended} device(s): " + ", ".join(parts)


class RolloutGuards:
    def __init__(self, policy: FleetPolicy, planner: RolloutPlanner) -> None:
        self.policy = policy
        self.planner = planner

    def free_slots(self, session: Session, rollout_id: int | None = None) -> int:
        """Download slots free server-wide, and in `rollout_id` when given (its
        own maxConcurrent, or the server's)."""
        server, per_rollout = self.slot_counts(session, [] if rollout_id is None else [rollout_id])
        return server if rollout_id is None else per_rollout[rollout_id]

    def slot_counts(
        self, session: Session, rollout_ids: Iterable[int]
    ) -> tuple[int, dict[int, int]]:
        """(slots free server-wide, slots free in each of `rollout_ids`), from one
        scan of the index entries of the rows holding a slot.

        A rollout's free slots are never more than the server's.
        """
        held = dict(_SLOTS_HELD.rows(session))
        server = max(0, self.policy.max_concurrent - sum(held.values()))
        wanted = set(rollout_ids)
        if not wanted:
            return server, {}
        own = dict(_OWN_LIMITS.rows(session, rollouts=sorted(wanted)))
        limit = self.policy.concurrent_for
        per_rollout = {
            rollout_id: max(0, min(server, limit(own.get(rollout_id)) - held.get(rollout_id, 0)))
            for rollout_id in wanted
        }
        return server, per_rollout

    @staticmethod
    def _finished(session: Session, rollout_id: int, buckets: range) -> tuple[int, int]:
        """(updated, failed) among a wave's devices that went through an update."""
        query = (
            select(RolloutDevice.state, func.count(RolloutDevice.id))
            .where(
                RolloutDevice.rollout_id == rollout_id,
                RolloutDevice.state.in_((DeviceState.UPDATED, DeviceState.FAILED)),
                RolloutDevice.already_current.is_(False),
                RolloutDevice.cohort_bucket >= buckets.start,
                RolloutDevice.cohort_bucket < buckets.stop,
            )
            .group_by(RolloutDevice.state)
        )
        counts = dict(session.execute(query).all())
        return counts.get(DeviceState.UPDATED, 0), counts.get(DeviceState.FAILED, 0)

    def check_health(self, session: Session, rollout: Rollout) -> bool:
        """Pause an active rollout whose failure ratio passed the threshold; True if it did.

        Judged on devices, as soon as an attempt fails, not once a device has
        used all its attempts: a bad firmware pauses after the first
        `ota.abort.min.devices` outcomes, before every device has failed
        three times. After a resume, only what happened since counts.
        """
        if rollout.state != RolloutState.ACTIVE:
            return False
        updated, failing = self._outcomes(session, rollout.id, rollout.resumed_at)
        judged = updated + failing
        if judged < self.policy.abort_min_devices or judged == 0:
            return False
        ratio, limit = failing / judged, self.policy.abort_ratio_for(rollout.abort_ratio)
        if ratio <= limit:
            return False
        setting = "abortRatio" if rollout.abort_ratio is not None else "ota.abort.failure.ratio"
        reason = (
            f"failure ratio {ratio:.2f} ({failing} of {judged} devices with an outcome "
            f"failed an attempt) is above {setting} {limit:g}"
        )
        return self.planner.pause(session, rollout, reason)

    @staticmethod
    def _outcomes(session: Session, rollout_id: int, since: datetime | None) -> tuple[int, int]:
        """(devices updated, devices whose latest attempt failed) since `since`, in one query.

        A row entering pending stamps `pending_at`, so for a device that was
        offered before (attempts > 0 while pending, > 1 once offered again)
        it is when its last attempt failed.
        """
        rd = RolloutDevice
        after = (lambda column: column > since) if since is not None else (lambda column: true())
        failing = or_(
            and_(rd.state == DeviceState.FAILED, after(rd.failed_at)),
            and_(rd.state == DeviceState.PENDING, rd.attempts >= 1, after(rd.pending_at)),
            and_(rd.state.in_(DeviceState.IN_FLIGHT), rd.attempts >= 2, after(rd.pending_at)),
            # Back on another build after updating: a failure of the firmware too.
            and_(rd.state == DeviceState.PENDING, rd.reverts >= 1, after(rd.pending_at)),
        )
        updated = and_(
            rd.state == DeviceState.UPDATED, rd.already_current.is_(False), after(rd.updated_at)
        )
        row = session.execute(
            select(
                func.coalesce(func.sum(case((updated, 1), else_=0)), 0),
                func.coalesce(func.sum(case((failing, 1), else_=0)), 0),
            ).where(rd.rollout_id == rollout_id)
        ).one()
        return int(row[0]), int(row[1])

    def complete_if_done(self, session: Session, rollout: Rollout) -> bool:
        """Mark an active rollout complete when every device it targets has an
        outcome; True if it did. A campaign's target is its devices registered
        now, once its whole share is open (a rollout held at percent= below 100
        completes when it is expanded to 100)."""
        if rollout.state != RolloutState.ACTIVE:
            return False
        counts = dict(
            session.execute(
                select(RolloutDevice.state, func.count())
                .where(RolloutDevice.rollout_id == rollout.id)
                .group_by(RolloutDevice.state)
            ).all()
        )
        ended = sum(counts.get(state, 0) for state in _OUTCOMES)
        if ended == 0 or any(counts.get(state) for state in DeviceState.OPEN):
            return False
        if rollout.scope != RolloutScope.DEVICE:
            if rollout.percent < 100:
                return False
            if ended < devices_in_scope(session, rollout.scope, target_of(rollout), rollout.tag):
                return False  # devices it has not met yet
        return self.planner.complete(session, rollout, outcome(counts))

    @staticmethod
    def reopen_joined(session: Session) -> int:
        """Complete rollouts with a device to decide again: active again. A device
        joined a campaign, an operator retried a failed one, or an updated one
        came back on another build (each enters pending)."""
        joined = session.scalars(
            select(Rollout.id).where(
                Rollout.state == RolloutState.COMPLETE,
                exists().where(
                    RolloutDevice.rollout_id == Rollout.id,
                    RolloutDevice.state.in_(DeviceState.OPEN),
                ),
            )
        ).all()
        return sum(RolloutPlanner.reopen(session, rollout_id) for rollout_id in joined)

    def advance_wave(self, session: Session, rollout: Rollout) -> bool:
        """Grow an active rollout to its next wave when the current one did well enough."""
        if rollout.state != RolloutState.ACTIVE or not rollout.waves:
            return False
        share, why = self.next_wave(session, rollout)
        return share is not None and self.planner.widen(session, rollout, share, why)

    def next_wave(self, session: Session, rollout: Rollout) -> tuple[int | None, str]:
        """(the share to grow to now, or None; why, in words for the rollout's status).

        A wave is judged on its own devices: it needs `ota.wave.min.devices`
        finished, or all of them when it has fewer, so a small fleet grows too.
        """
        waves = parse_waves(rollout.waves or "")
        following = [share for share in waves if share > rollout.percent]
        if not following:
            return None, "in its last wave"
        # The current wave: the devices the latest widening let in.
        previous = max((share for share in waves if share < rollout.percent), default=0)
        current = range(previous, rollout.percent)
        label = f"wave {previous}-{rollout.percent}%"
        size = self._taking_the_update(session, rollout.id, current)
        if size == 0:
            members = self._registered_in(session, rollout, current)
            if not members:
                # No device hashes into this wave at all: nothing to wait for.
                return following[0], f"{label} has no device"
            return None, (
                f"{label}: none of its {members} device(s) has logged in since the start "
                "(devices enter when they log in, or at once with now=true)"
            )
        updated, failed = self._finished(session, rollout.id, current)
        finished = updated + failed
        needs = min(self.policy.wave_min_devices, size)
        wanted = rollout.success_percent if rollout.success_percent is not None else 100
        if finished < needs:
            return None, (
                f"{label}: {finished} of {size} device(s) finished; the next wave opens "
                f"when {needs} have, with at least {wanted}% updated"
            )
        success = 100 * updated / finished
        if success < wanted:
            left = size - finished
            outlook = (
                f"{left} still to finish"
                if left
                else "all finished: it cannot grow, retry the failed devices or stop it"
            )
            return None, (
                f"{label}: {success:.0f}% updated of {finished} finished, below the "
                f"{wanted}% needed ({outlook})"
            )
        if rollout.wave_delay and rollout.wave_opened_at is not None:
            # Phases in time (waveDelay=24h): success alone does not open the next.
            opens = rollout.wave_opened_at + timedelta(seconds=rollout.wave_delay)
            if utcnow() < opens:
                return None, (
                    f"{label}: {success:.0f}% updated of {finished} finished; the next wave "
                    f"opens at {opens:%Y-%m-%d %H:%M:%S} UTC (waveDelay)"
                )
        why = f"wave reached {success:.0f}% updated of {finished} finished (needs {wanted}%)"
        return following[0], why

    @staticmethod
    def _registered_in(session: Session, rollout: Rollout, buckets: range) -> int:
        """Registered devices of the rollout's scope whose bucket falls in `buckets`.

        Hashes every token of the scope: only asked when no device of the wave
        has entered the rollout, to tell an empty wave from one still waiting.
        """
        return sum(
            bucket(rollout.cohort_seed, token) in buckets
            for token in tokens_in_scope(session, rollout.scope, target_of(rollout), rollout.tag)
        )

    @staticmethod
    def _taking_the_update(session: Session, rollout_id: int, buckets: range) -> int:
        """Devices of these buckets in the rollout that were not already on its build.

        A device still pending here while it holds another rollout's offer is
        not this wave's: that attempt, not this rollout, decides when it is
        free, and the wave does not wait for it."""
        rd, other = RolloutDevice, aliased(RolloutDevice)
        held_elsewhere = exists().where(
            other.device_id == rd.device_id,
            other.rollout_id != rd.rollout_id,
            other.state.in_(DeviceState.IN_FLIGHT),
        )
        return session.scalar(
            select(func.count(rd.id)).where(
                rd.rollout_id == rollout_id,
                rd.already_current.is_(False),
                rd.cohort_bucket >= buckets.start,
                rd.cohort_bucket < buckets.stop,
                ~and_(rd.state == DeviceState.PENDING, held_elsewhere),
            )
        )
