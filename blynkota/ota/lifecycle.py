"""Per-device update lifecycle: attempts, failures with reasons, retries with backoff.

The Blynk server re-sends `ota` at every login while a build differs, so a
board whose update fails loops forever. Here each (rollout, device) pair is a
row whose state moves only on what the server itself observes:

- an `ota` frame written            -> offered (one attempt used)
- the download request for it       -> downloading, then downloaded when
                                       every byte was written
- a login reporting the target      -> updated
- a login reporting anything else   -> the attempt failed ("came back with
  after an offer                       build X", "download interrupted at N of
                                       M bytes")
- no such login within the timeout  -> the attempt failed ("timed out")

A failed attempt waits out an exponential backoff (pending again, with
next_attempt_at) until `max_attempts` are used; then the device is failed and
never offered that rollout again. All of it is in the database, so a restart
resumes every timer from its stored time.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..store import DeviceState, Firmware, Rollout, RolloutDevice, RolloutState
from .device_states import move, start_tracking

if TYPE_CHECKING:
    from .rollouts import Candidate

__all__ = ["RetryPolicy", "UpdateLifecycle"]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff: float = 60.0  # seconds before the 2nd attempt; doubles after each failure
    attempt_timeout: float = 900.0  # seconds from an offer to the login with the target

    def next_attempt_at(self, attempts_used: int, now: datetime) -> datetime:
        return now + timedelta(seconds=self.backoff * 2 ** max(0, attempts_used - 1))


# What a failed attempt turns into when its rollout no longer offers anything.
_ENDED_ROLLOUT = {
    RolloutState.STOPPED: DeviceState.CANCELLED,
    RolloutState.SUPERSEDED: DeviceState.SUPERSEDED,
}


class UpdateLifecycle:
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def resolve_in_flight(
        self,
        session: Session,
        device_id: int,
        reported_build: str | None,
        now: datetime,
        bytes_written: dict[int, int],
    ) -> bool:
        """A login ends every open attempt of the device, in any rollout; True if any."""
        rows = session.execute(
            select(RolloutDevice, Rollout.state, Firmware.build, Firmware.size)
            .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .join(Firmware, Firmware.id == Rollout.firmware_id)
            .where(
                RolloutDevice.device_id == device_id,
                RolloutDevice.state.in_(DeviceState.IN_FLIGHT),
            )
        ).all()
        for row, rollout_state, target, size in rows:
            if target is not None and reported_build == target:
                move(session, row, DeviceState.UPDATED, now)
            elif target is None and row.state == DeviceState.DOWNLOADED:
                # Nothing to compare: a complete download and a login is all there is.
                move(
                    session,
                    row,
                    DeviceState.UPDATED,
                    now,
                    "logged in after a complete download (the firmware has no build)",
                )
            else:
                sent = max(row.bytes_sent or 0, bytes_written.get(row.id, 0))
                if row.state == DeviceState.DOWNLOADING and sent < size:
                    reason = f"download interrupted at {sent} of {size} bytes"
                elif reported_build:
                    reason = f"came back with build {reported_build}"
                else:
                    reason = "came back reporting no build"
                self.fail_attempt(session, row, rollout_state, reason, now)
        return bool(rows)

    def fail_attempt(
        self, session: Session, row: RolloutDevice, rollout_state: str, reason: str, now: datetime
    ) -> None:
        row.last_error = reason[:255]
        if rollout_state in _ENDED_ROLLOUT:
            move(session, row, _ENDED_ROLLOUT[rollout_state], now, reason)
        elif row.attempts >= self.policy.max_attempts:
            move(
                session,
                row,
                DeviceState.FAILED,
                now,
                f"{reason}; all {row.attempts} attempt(s) used",
            )
        else:
            row.next_attempt_at = self.policy.next_attempt_at(row.attempts, now)
            move(
                session,
                row,
                DeviceState.PENDING,
                now,
                f"{reason}; next attempt after {row.next_attempt_at:%Y-%m-%d %H:%M:%S} UTC",
            )

    def row_to_offer(
        self,
        session: Session,
        device_id: int,
        token: str,
        reported_build: str | None,
        candidate: "Candidate",
        now: datetime,
    ) -> RolloutDevice | None:
        """The device's row in its rollout, if an offer is due now.

        A device enters the rollout (gets its row) the first time it is seen
        taking part: inside the rollout's percentage, and either on the target
        already or judged by its build.
        """
        row = session.scalar(
            select(RolloutDevice).where(
                RolloutDevice.rollout_id == candidate.rollout_id,
                RolloutDevice.device_id == device_id,
            )
        )
        on_target = candidate.build is not None and reported_build == candidate.build
        if row is None:
            taking_part, device_bucket, wave = candidate.takes_part(token)
            if not taking_part or not (on_target or candidate.may_offer(reported_build)):
                return None
            row = start_tracking(
                session,
                rollout_id=candidate.rollout_id,
                device_id=device_id,
                state=DeviceState.UPDATED if on_target else DeviceState.PENDING,
                at=now,
                detail=None if wave is None else f"wave {wave} (bucket {device_bucket})",
            )
            row.cohort_bucket, row.wave = device_bucket, wave
            if on_target:
                return None
        if row.state != DeviceState.PENDING:
            return None
        if on_target:
            move(session, row, DeviceState.UPDATED, now)
            return None
        if row.next_attempt_at is not None and row.next_attempt_at > now:
            return None  # backing off
        if candidate.state != RolloutState.ACTIVE:
            return None  # paused: it waits, pending
        return row

    @staticmethod
    def offer_made(session: Session, row: RolloutDevice, now: datetime, url: str) -> None:
        row.attempts += 1
        row.first_offered_at = row.first_offered_at or now
        row.next_attempt_at = None
        row.bytes_sent = None
        move(session, row, DeviceState.OFFERED, now, f"attempt {row.attempts}: {url}"[:255])

    def time_out_attempts(self, session: Session, now: datetime) -> int:
        """Fail the attempts whose device did not come back updated in time."""
        deadline = now - timedelta(seconds=self.policy.attempt_timeout)
        rows = session.execute(
            select(RolloutDevice, Rollout.state)
            .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(
                RolloutDevice.state.in_(DeviceState.IN_FLIGHT),
                RolloutDevice.offered_at < deadline,
            )
        ).all()
        for row, rollout_state in rows:
            self.fail_attempt(session, row, rollout_state, "timed out", now)
        return len(rows)

    @staticmethod
    def end_rollout(
        session: Session, rollout_id: int, device_state: str, now: datetime, detail: str
    ) -> None:
        """Pending devices leave a stopped or replaced rollout; attempts in flight finish."""
        rows = session.scalars(
            select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout_id,
                RolloutDevice.state == DeviceState.PENDING,
            )
        ).all()
        for row in rows:
            move(session, row, device_state, now, detail)
