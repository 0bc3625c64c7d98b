"""Rollout-level changes: start, pause, resume, widen, stop (rollout states)."""

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from ...store import (
    DeviceState,
    Firmware,
    Rollout,
    RolloutEvent,
    RolloutState,
    utcnow,
)
from .candidates import TARGET_COLUMN, running_key, target_of
from .cohorts import Controls
from .lifecycle import UpdateLifecycle

__all__ = ["RolloutPlanner"]


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
        """Create a rollout; the running one for the same scope, target and tag is superseded.

        The unique running key decides between processes starting rollouts for
        one target at the same moment: the second to set it gets a duplicate
        key, and its unit of work runs again (superseding the first).
        """
        now = utcnow()
        controls = controls or Controls()
        scheduled = controls.start_at is not None and controls.start_at > now
        rollout = Rollout(
            scope=scope,
            firmware_id=firmware.id,
            started_by=started_by,
            started_at=now,
            state=RolloutState.SCHEDULED if scheduled else RolloutState.ACTIVE,
            tag=controls.tag,
            start_at=controls.start_at,
            window_start=controls.window[0] if controls.window else None,
            window_end=controls.window[1] if controls.window else None,
            window_tz=controls.window_tz if controls.window else None,
            push_online=controls.push_online,
            allow_downgrade=controls.allow_downgrade,
            enrol_due_at=now if controls.push_online and not scheduled else None,
            percent=controls.start_percent,
            waves=",".join(map(str, controls.waves)) or None,
            success_percent=controls.success_percent,
            cohort_seed=firmware.sha256[:16],
            max_concurrent=controls.max_concurrent,
            attempt_timeout=controls.attempt_timeout,
            max_attempts=controls.max_attempts,
            abort_ratio=controls.abort_ratio,
            wave_delay=controls.wave_delay,
            health_window=controls.health_window,
            wave_opened_at=now if controls.waves and not scheduled else None,
        )
        if scope in TARGET_COLUMN:
            setattr(rollout, TARGET_COLUMN[scope].key, target_id)
        rollout.firmware = firmware
        session.add(rollout)
        session.flush()
        verb = "started"
        if scheduled:
            verb = f"scheduled for {controls.start_at:%Y-%m-%d %H:%M:%S} UTC"
        _log(
            session,
            rollout.id,
            None,
            rollout.state,
            f"{verb} by {started_by}{_describe(controls)}",
            now,
        )
        if not scheduled:
            key = running_key(scope, target_id, controls.tag)
            self._take_over(session, rollout.id, key, started_by, now)
        return rollout

    def _take_over(self, session: Session, rollout_id: int, key: str, by: str, now) -> None:
        """The rollout becomes the one running for its scope and target: the
        one running there until now is superseded."""
        running = session.execute(
            select(Rollout.id, Rollout.state).where(Rollout.running_key == key).with_for_update()
        ).all()
        for old_id, old_state in running:
            self._end(
                session, old_id, old_state, RolloutState.SUPERSEDED, by, now,
                superseded_by_id=rollout_id,
            )  # fmt: skip
        session.execute(
            update(Rollout)
            .where(Rollout.id == rollout_id)
            .values(running_key=key)
            .execution_options(synchronize_session=False)
        )

    def start_scheduled(self, session: Session, rollout: Rollout, now) -> bool:
        """A scheduled rollout whose time has come starts (once: a conditional
        UPDATE, whatever the number of nodes sweeping); True if this call did it."""
        result = session.execute(
            update(Rollout)
            .where(Rollout.id == rollout.id, Rollout.state == RolloutState.SCHEDULED)
            .values(
                state=RolloutState.ACTIVE,
                started_at=now,
                enrol_due_at=now if rollout.push_online else None,
                wave_opened_at=now if rollout.waves else None,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            return False
        _log(session, rollout.id, RolloutState.SCHEDULED, RolloutState.ACTIVE,
             f"started as scheduled (startAt {rollout.start_at:%Y-%m-%d %H:%M:%S} UTC)",
             now)  # fmt: skip
        key = running_key(rollout.scope, target_of(rollout), rollout.tag)
        self._take_over(session, rollout.id, key, rollout.started_by, now)
        return True

    def stop(self, session: Session, stopped_by: str, rollout_id: int | None = None) -> int:
        """Stop one rollout, or every running one; returns how many this call stopped."""
        query = select(Rollout.id, Rollout.state).where(Rollout.state.in_(RolloutState.LIVE))
        if rollout_id is not None:
            query = query.where(Rollout.id == rollout_id)
        now = utcnow()
        return sum(
            self._end(session, found_id, state, RolloutState.STOPPED, stopped_by, now)
            for found_id, state in session.execute(query.with_for_update()).all()
        )

    @staticmethod
    def pause(session: Session, rollout: Rollout, reason: str) -> bool:
        # A complete campaign too: it then offers nothing to the devices that join it.
        before = (
            RolloutState.COMPLETE if rollout.state == RolloutState.COMPLETE else RolloutState.ACTIVE
        )
        return _change_state(
            session,
            rollout.id,
            before,
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
    def complete(session: Session, rollout: Rollout, outcome: str) -> bool:
        return _change_state(
            session, rollout.id, RolloutState.ACTIVE, RolloutState.COMPLETE, f"complete: {outcome}"
        )

    @staticmethod
    def reopen(session: Session, rollout_id: int) -> bool:
        return _change_state(
            session,
            rollout_id,
            RolloutState.COMPLETE,
            RolloutState.ACTIVE,
            "active again: a device to update (joined, retried or reverted)",
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
        ("healthWindow", controls.health_window),
    ):
        if value is not None:
            parts.append(f"{name}={value:g}")
    if controls.window:
        start, end = controls.window
        parts.append(f"window={start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}")
        parts.append(f"tz={controls.window_tz}")
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
