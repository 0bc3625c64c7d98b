"""The rollouts' clock: attempts that time out, health windows that end,
failure thresholds, waves that grow, and connected devices entered into a
rollout (now=true, expand, a grown wave). The sweep runs on the node holding
the sweeper lease (runner.py); the enrolment of connected devices on the
process that answered the request, or on the sweeper if that process
stopped first.
"""

import logging

import gevent
from gevent.event import Event
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..store import Database, Rollout, RolloutState, utcnow
from .rollouts.enrolment import OnlineEnrolment
from .rollouts.guards import RolloutGuards
from .rollouts.health import catch_silence, end_windows
from .rollouts.lifecycle import UpdateLifecycle

__all__ = ["ENROLMENT_GRACE", "RolloutClock"]

log = logging.getLogger(__name__)

# Seconds an owed enrolment is left to the process that answered the request
# before the sweeper does it (that process may have stopped).
ENROLMENT_GRACE = 15.0


class RolloutClock:
    def __init__(
        self,
        db: Database,
        lifecycle: UpdateLifecycle,
        guards: RolloutGuards,
        fill_due: Event,
    ) -> None:
        self.db, self.lifecycle, self.guards, self.fill_due = db, lifecycle, guards, fill_due
        self.enrolment = OnlineEnrolment(db)

    def sweep(self) -> tuple[int, int]:
        """The rollouts' clock, run by the node holding the sweeper lease.

        Times out stale attempts, ends the health windows that passed and
        fails the devices that never came back after their download (health.py),
        pauses rollouts past the failure threshold,
        grows waves (entering connected devices for now=true rollouts), marks
        the rollouts whose every device has an outcome complete, and makes a
        complete one active again when it has a device to update again.
        Returns (attempts timed out, devices entered into grown waves).
        """

        def work(session: Session) -> tuple[int, list[int]]:
            now = utcnow()
            health = self.lifecycle.health
            timed_out = catch_silence(session, health, now)
            timed_out += self.lifecycle.time_out_attempts(session, now)
            end_windows(session, health, now)
            if self.guards.reopen_joined(session):
                self.fill_due.set()  # their pending devices are offered
            grown = self._start_scheduled(session, now)
            for rollout in session.scalars(
                select(Rollout).where(Rollout.state == RolloutState.ACTIVE)
            ).all():
                if self.guards.check_health(session, rollout):
                    continue
                if self.guards.advance_wave(session, rollout) and rollout.push_online:
                    grown.append(rollout.id)
                elif self.guards.complete_if_done(session, rollout):
                    log.info("rollout %d complete", rollout.id)
            return timed_out, grown

        timed_out, grown = self.db.run(work)
        if timed_out:
            self.fill_due.set()
        owed = set(grown) | set(self.enrolment.overdue(ENROLMENT_GRACE))
        entered = sum(self.enrol_online(rollout_id) for rollout_id in sorted(owed))
        return timed_out, entered

    def _start_scheduled(self, session: Session, now) -> list[int]:
        """Scheduled rollouts whose startAt has come start (planner.start_scheduled,
        once whatever the number of nodes); those with now=true enter their
        connected devices at once (returned)."""
        due = session.scalars(
            select(Rollout).where(Rollout.state == RolloutState.SCHEDULED, Rollout.start_at <= now)
        ).all()
        started = [
            rollout for rollout in due if self.guards.planner.start_scheduled(session, rollout, now)
        ]
        for rollout in started:
            log.info("rollout %d started as scheduled", rollout.id)
            self.fill_due.set()
        return [rollout.id for rollout in started if rollout.push_online]

    def enrol_online(self, rollout_id: int) -> int:
        """now=true, expand, a grown wave: connected devices enter (enrolment.py)."""
        entered = self.enrolment.enter_connected(rollout_id)
        if entered:
            self.fill_due.set()
        return entered

    def enrol_in_background(self, rollout_id: int) -> None:
        """Enter the connected devices after the request has its answer.

        The rollout row says the work is owed (`enrol_due_at`): if this fails,
        or the process stops, the sweeper does it after ENROLMENT_GRACE.
        """

        def work() -> None:
            try:
                self.enrol_online(rollout_id)
            except Exception as error:
                log.warning(
                    "rollout %d: entering connected devices failed (%s); the sweeper retries",
                    rollout_id,
                    error,
                )

        gevent.spawn(work)
