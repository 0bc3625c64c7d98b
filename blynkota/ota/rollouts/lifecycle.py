"""Per-device update lifecycle: attempts, failures with reasons, retries with backoff.

The Blynk server re-sends `ota` at every login while a build differs, so a
board whose update fails loops forever. Here each (rollout, device) pair is a
row whose state moves only on what the server itself observes:

- an `ota` frame written            -> offered (one attempt used)
- the download request for it       -> downloading, then downloaded when
                                       every byte was written
- a login reporting the target      -> verifying, then updated once its
                                       health window passed (health.py)
- a login reporting anything else   -> the attempt failed ("came back with
  after an offer                       build X", "download interrupted at N of
                                       M bytes")
- no such login within the timeout  -> the attempt failed ("timed out")

A failed attempt waits out an exponential backoff (pending again, with
next_attempt_at) until `max_attempts` are used; then the device is failed and
never offered that rollout again. All of it is in the database, so a restart
resumes every timer from its stored time. Every change is a conditional write
(device_states.move); a decision whose row another process changed first is
taken again on the row as it is now.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, func, or_, select
from sqlalchemy.orm import Session

from ...store import DeviceState, Firmware, Rollout, RolloutDevice, RolloutState
from .candidates import Candidate
from .compatibility import BoardReport
from .device_states import (
    Track,
    enter_all,
    load_tracks,
    move,
    move_all,
    node_run_ended,
    run_tracks_query,
    tracks_query,
)
from .health import ENDED_ROLLOUT, AttemptContext, HealthPolicy, judge_verifying, reached_target

__all__ = ["ReportedBuild", "RetryPolicy", "UpdateLifecycle", "rollout_entry"]

# How often a decision is taken again when another process moved its row first.
_RETAKES = 3


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff: float = 60.0  # seconds before the 2nd attempt; doubles after each failure
    attempt_timeout: float = 900.0  # seconds from an offer to the login with the target
    offer_timeout: float = 120.0  # seconds from an offer to the first request for its file

    def next_attempt_at(self, attempts_used: int, now: datetime) -> datetime:
        return now + timedelta(seconds=self.backoff * 2 ** max(0, attempts_used - 1))

    # A rollout's own limit where it set one (maxAttempts=, attemptTimeout=), else these.
    def attempts_for(self, own: int | None) -> int:
        return self.max_attempts if own is None else own

    def timeout_for(self, own: float | None) -> float:
        return self.attempt_timeout if own is None else own


# Devices' open attempts and health windows, each with what judging it needs
# (AttemptContext): read for every batch of info messages (by device) and
# again for the rows another process moved first (by row id). Built once, on
# the tables.
_rd, _rollouts, _firmware = RolloutDevice.__table__, Rollout.__table__, Firmware.__table__
_JUDGED_AT_LOGIN = (*DeviceState.IN_FLIGHT, DeviceState.VERIFYING)
_IN_FLIGHT_WITH_TARGET = (
    _rollouts.c.id == _rd.c.rollout_id,
    _firmware.c.id == _rollouts.c.firmware_id,
    _rd.c.state.in_(_JUDGED_AT_LOGIN),
)
_TARGET_COLUMNS = (
    _rollouts.c.state,
    _firmware.c.build,
    _firmware.c.size,
    _rollouts.c.health_window,
    _rd.c.verifying_at,
    _rd.c.health_logins,
)
_IN_FLIGHT_OF_DEVICES = tracks_query(
    _rd.c.device_id.in_(bindparam("devices", expanding=True)),
    *_IN_FLIGHT_WITH_TARGET,
    extra=_TARGET_COLUMNS,
)
_IN_FLIGHT_ROWS = tracks_query(
    _rd.c.id.in_(bindparam("rows", expanding=True)),
    *_IN_FLIGHT_WITH_TARGET,
    extra=_TARGET_COLUMNS,
)


# A batch's rows in its candidate rollouts (pairs are filtered in memory).
_TRACKS_OF_PAIRS = tracks_query(
    _rd.c.rollout_id.in_(bindparam("rollouts", expanding=True)),
    _rd.c.device_id.in_(bindparam("devices", expanding=True)),
)


@dataclass(frozen=True)
class ReportedBuild:
    """A device's info message, judged against the rollout that owns it."""

    device_id: int
    token: str
    build: str | None
    candidate: Candidate
    hardware: str | None = None  # the `dev` it reported
    fw_type: str | None = None
    fw_version: str | None = None

    @property
    def board(self) -> BoardReport:
        return BoardReport(self.hardware, self.fw_type, self.fw_version, self.build)


def _offer_outlived(session: Session, track: Track) -> bool:
    """Whether the node run that made the row's latest offer has ended since
    (offered before runs were recorded: charged as before)."""
    return node_run_ended(
        session, track.id, RolloutDevice.offer_node_id, RolloutDevice.offer_node_run
    )


def rollout_entry(
    candidate: Candidate,
    device_id: int,
    token: str,
    board: BoardReport,
    *,
    online: bool = False,
) -> dict | None:
    """The row a device enters `candidate` with (for `enter_all`), or None if it
    does not take part: outside the rollout's percentage, or with a build the
    rollout may not replace. A device that may not be given the image (another
    firmware type, a chip that cannot run it, a downgrade: compatibility.py)
    enters as incompatible, with the reason, and is never offered it.
    `online`: entered while connected (now=true, expand, a grown wave) rather
    than at its own login, which its event says.
    """
    on_target = candidate.runs_on(board)
    taking_part, device_bucket, wave = candidate.takes_part(token)
    if not taking_part or not (on_target or candidate.may_offer(board.build)):
        return None
    wave_detail = None if wave is None else f"wave {wave} (bucket {device_bucket})"
    unfit = None if on_target else candidate.unfit_for(board)
    if unfit is not None:
        state, detail = DeviceState.INCOMPATIBLE, unfit
    elif online:
        state = DeviceState.UPDATED if on_target else DeviceState.PENDING
        detail = (
            None if on_target else ", ".join(filter(None, ("targeted while online", wave_detail)))
        )
    else:
        state = DeviceState.UPDATED if on_target else DeviceState.PENDING
        detail = wave_detail
    return {
        "rollout_id": candidate.rollout_id,
        "device_id": device_id,
        "state": state,
        "detail": detail,
        "cohort_bucket": device_bucket,
        "wave": wave,
        "last_error": unfit,
    }


class UpdateLifecycle:
    def __init__(self, policy: RetryPolicy, health: HealthPolicy | None = None, node=None) -> None:
        """`node`: the ClusterNode whose device sessions this process judges."""
        self.policy = policy
        self.health = health or HealthPolicy()
        self.node = node

    @property
    def here(self) -> tuple[int, int] | None:
        """(node id, run) of this process's device sessions, once registered:
        recorded with a health login (health.py)."""
        node = self.node
        return None if node is None or node.id is None else (node.id, node.run_number)

    @staticmethod
    def in_flight_by_device(session: Session, device_ids: list[int]) -> dict[int, list]:
        """The open attempts and health windows of these devices, by device: one
        query for a batch of logins."""
        grouped: dict[int, list] = {}
        parameters = {"devices": sorted(set(device_ids))}
        for row in run_tracks_query(session, _IN_FLIGHT_OF_DEVICES, parameters):
            grouped.setdefault(row[0].device_id, []).append(row)
        return grouped

    def resolve_in_flight(
        self,
        session: Session,
        rows: list,
        reported_build: str | None,
        now: datetime,
        written: dict[int, int],
    ) -> bool:
        """A login ends every open attempt of the device, in any rollout, and
        is judged by every health window it is in; True if there was any.

        `rows` are the device's, from `in_flight_by_device`; `written`, the
        bytes this process's downloads in progress have written, by row.
        """
        found = bool(rows)
        for _ in range(_RETAKES):
            judged = [(track, AttemptContext(*columns)) for track, *columns in rows]
            # A build another of its rows aims at was taken through that attempt.
            taken = {c.target for track, c in judged if track.state in DeviceState.IN_FLIGHT}
            lost = [
                track.id
                for track, context in judged
                if not self._judge(session, track, context, reported_build, taken, now, written)
            ]
            if not lost:
                break
            # Another process moved these first (a download that just ended):
            # decide again on the rows as they are now.
            rows = run_tracks_query(session, _IN_FLIGHT_ROWS, {"rows": lost})
        return found

    def _judge(self, session, track, context, reported_build, taken, now, written) -> bool:
        """One row of a device that logged in; True if it was still as seen."""
        if track.state != DeviceState.VERIFYING:
            return self._settle(session, track, context, reported_build, now, written)
        moved_on = reported_build in taken and reported_build != context.target
        return judge_verifying(
            session, track, context, self.health, reported_build, moved_on, now, self.here
        )

    def _settle(
        self,
        session: Session,
        track: Track,
        context: AttemptContext,
        reported_build: str | None,
        now: datetime,
        bytes_written: dict[int, int],
    ) -> bool:
        target, window = context.target, self.health.window_for(context.health_window)
        if target is not None and reported_build == target:
            return reached_target(session, track, window, now, here=self.here)
        if target is None and track.state == DeviceState.DOWNLOADED:
            # Nothing to compare: a complete download and a login is all there is.
            detail = "logged in after a complete download (the firmware has no build)"
            return reached_target(session, track, window, now, detail, here=self.here)
        sent = max(track.bytes_sent or 0, bytes_written.get(track.id, 0))
        if track.state == DeviceState.DOWNLOADING and sent < context.size:
            reason = f"download interrupted at {sent} of {context.size} bytes"
        elif reported_build:
            reason = f"came back with build {reported_build}"
        else:
            reason = "came back reporting no build"
        return self.fail_attempt(session, track, context.rollout_state, reason, now)

    def fail_attempt(
        self, session: Session, track: Track, rollout_state: str, reason: str, now: datetime
    ) -> bool:
        """End an attempt; True if the row was still as `track` saw it."""
        error = reason[:255]
        if rollout_state in ENDED_ROLLOUT:
            return move(session, track, ENDED_ROLLOUT[rollout_state], now, reason, last_error=error)
        if track.state != DeviceState.DOWNLOADED and _offer_outlived(session, track):
            # The run of the node that made the offer ended before the download
            # completed (a crash, a restart): the server cut it, not the device.
            return move(
                session,
                track,
                DeviceState.PENDING,
                now,
                f"{reason}: not counted, the server stopped before the download completed",
                attempts=track.attempts - 1,
                next_attempt_at=None,
            )
        if track.attempts >= self.max_attempts(session, track.rollout_id):
            return move(
                session,
                track,
                DeviceState.FAILED,
                now,
                f"{reason}; all {track.attempts} attempt(s) used",
                last_error=error,
            )
        retry_at = self.policy.next_attempt_at(track.attempts, now)
        return move(
            session,
            track,
            DeviceState.PENDING,
            now,
            f"{reason}; next attempt after {retry_at:%Y-%m-%d %H:%M:%S} UTC",
            last_error=error,
            next_attempt_at=retry_at,
        )

    def rows_to_offer(
        self, session: Session, reports: list["ReportedBuild"], now: datetime
    ) -> list[bool]:
        """For each report, whether an offer is due now in its candidate rollout.

        A device enters the rollout (gets its row) the first time it is seen
        taking part: inside the rollout's percentage, and either on the target
        already or judged by its build. A batch of logins reads its rows in
        one query and enters its new devices in one INSERT; two processes
        entering a device at once collide on the unique key, and the loser's
        unit of work runs again.
        """
        pairs = {(report.candidate.rollout_id, report.device_id) for report in reports}
        known = {
            (track.rollout_id, track.device_id): track
            for track in run_tracks_query(
                session,
                _TRACKS_OF_PAIRS,
                {
                    "rollouts": sorted({rollout for rollout, _ in pairs}),
                    "devices": sorted({device for _, device in pairs}),
                },
            )
        }
        entering: list[dict] = []
        due = []
        for report in reports:
            pair = (report.candidate.rollout_id, report.device_id)
            if pair in known and known[pair] is None:
                # Entered earlier in this batch (one device, two reports): read its row.
                enter_all(session, entering, now)
                entering = []
                known[pair] = load_tracks(
                    session,
                    RolloutDevice.rollout_id == pair[0],
                    RolloutDevice.device_id == pair[1],
                )[0]
            track = known.get(pair)
            if track is None:
                entry = rollout_entry(
                    report.candidate, report.device_id, report.token, report.board
                )
                if entry is not None:
                    entering.append(entry)
                    known[pair] = None
                due.append(
                    entry is not None
                    and entry["state"] == DeviceState.PENDING
                    and report.candidate.state == RolloutState.ACTIVE
                )
            else:
                due.append(self._due(session, track, report, now))
        enter_all(session, entering, now)
        return due

    def _due(self, session: Session, track: Track, report: "ReportedBuild", now: datetime) -> bool:
        candidate = report.candidate
        if track.state == DeviceState.UPDATED:
            return self._reverted(session, track, report, now)
        board = report.board
        on_target = candidate.runs_on(board)
        unfit = None if on_target else candidate.unfit_for(board)
        if track.state == DeviceState.INCOMPATIBLE:
            if unfit is not None:
                return False
            # Another board under the same token, or a corrected `dev`: judged again.
            move(session, track, DeviceState.PENDING, now, last_error=None)
        if track.state != DeviceState.PENDING:
            return False
        if on_target:
            window = self.health.window_for(candidate.health_window)
            reached_target(session, track, window, now, here=self.here)
            return False
        if unfit is not None:
            move(session, track, DeviceState.INCOMPATIBLE, now, unfit, last_error=unfit)
            return False
        if track.next_attempt_at is not None and track.next_attempt_at > now:
            return False  # backing off
        return candidate.state == RolloutState.ACTIVE  # paused: it waits, pending

    def _reverted(
        self, session: Session, track: Track, report: "ReportedBuild", now: datetime
    ) -> bool:
        """An updated device back on another build (a rollback, a re-flash by hand)
        while its rollout still owns it: recorded, and offered again under the
        same attempt rules. True if an offer is due now."""
        candidate = report.candidate
        if candidate.runs_on(report.board) or candidate.build is None or not report.build:
            return False  # still on the target, or nothing to judge by
        reason = f"reverted: came back with build {report.build} after updating"
        changes = {
            "last_error": reason[:255],
            "reverts": RolloutDevice.reverts + 1,
            "already_current": False,  # it needs the update now, and is judged on it
        }
        if track.attempts >= self.max_attempts(session, track.rollout_id):
            detail = f"{reason}; all {track.attempts} attempt(s) used"
            move(session, track, DeviceState.FAILED, now, detail, **changes)
            return False
        # A device that updated through an attempt backs off as after a failed
        # one; one that was on the build from the start is offered at once.
        retry_at = self.policy.next_attempt_at(track.attempts, now) if track.attempts else None
        moved = move(
            session, track, DeviceState.PENDING, now, reason, next_attempt_at=retry_at, **changes
        )
        return moved and retry_at is None and candidate.state == RolloutState.ACTIVE

    def max_attempts(self, session: Session, rollout_id: int) -> int:
        """The rollout's own maxAttempts, or the server's ota.max.attempts."""
        own = session.scalar(select(Rollout.max_attempts).where(Rollout.id == rollout_id))
        return self.policy.attempts_for(own)

    def time_out_attempts(self, session: Session, now: datetime) -> int:
        """Fail the attempts whose device did not come back updated in time
        (the rollout's own attemptTimeout, or ota.attempt.timeout), and the
        offers nobody downloaded within ota.offer.timeout: a board that took
        the command and never asked for the file holds a download slot (and
        its place in a wave) no longer than that."""
        # Attempts in flight may belong to a stopped rollout too: the shortest
        # timeout of any rollout bounds the rows read, each is judged on its own.
        shortest = session.scalar(select(func.min(Rollout.attempt_timeout)))
        default = self.policy.attempt_timeout
        offer_limit = now - timedelta(seconds=self.policy.offer_timeout)
        rows = load_tracks(
            session,
            Rollout.id == RolloutDevice.rollout_id,
            RolloutDevice.state.in_(DeviceState.IN_FLIGHT),
            or_(
                RolloutDevice.offered_at
                < now - timedelta(seconds=min(default, shortest or default)),
                and_(
                    RolloutDevice.state == DeviceState.OFFERED,
                    RolloutDevice.offered_at < offer_limit,
                ),
            ),
            extra=(Rollout.state, Rollout.attempt_timeout, RolloutDevice.offered_at),
        )
        failed = 0
        for track, rollout_state, timeout, offered_at in rows:
            if offered_at < now - timedelta(seconds=self.policy.timeout_for(timeout)):
                reason = "timed out"
            elif track.state == DeviceState.OFFERED and offered_at < offer_limit:
                reason = (f"offered, never downloaded within ota.offer.timeout "
                          f"({self.policy.offer_timeout:g} s)")  # fmt: skip
            else:
                continue
            failed += self.fail_attempt(session, track, rollout_state, reason, now)
        return failed

    @staticmethod
    def end_rollout(
        session: Session, rollout_id: int, device_state: str, now: datetime, detail: str
    ) -> None:
        """Pending devices leave a stopped or replaced rollout; attempts in flight finish."""
        pending = load_tracks(
            session,
            RolloutDevice.rollout_id == rollout_id,
            RolloutDevice.state == DeviceState.PENDING,
            for_update=True,
        )
        move_all(session, pending, device_state, now, detail)
