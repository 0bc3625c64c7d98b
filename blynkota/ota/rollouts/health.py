"""The health window: a device on the new build proves it before it counts as updated.

A Blynk device tells the server enough to judge a firmware without an agent
on it: every reboot is a new login, and a board that rolled back logs in
with the old build. So a device that reports the rollout's build after an
attempt is `verifying` for the rollout's window (healthWindow=, else
ota.health.window) and only then `updated`. Trouble fails it for good (until
an operator retries it), which counts towards the rollout's abortRatio:

- a crash loop: ota.health.max.logins logins inside the window, the one
  that reported the build included. A login whose last session the server
  closed (the node run that held it has ended: a restart, a deploy) is not
  counted: the board did not reboot, its server did;
- a rollback: a login inside the window reporting another build;
- silence: no login within ota.health.return of the completed download.

All of it is rows and stamps (verifying_at, health_logins, downloaded_at),
so a restart resumes every window where it was; the sweep ends the windows
(clock.py), the logins judge them (lifecycle.py).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ...numbers import in_words
from ...store import DeviceState, HealthOutcome, Node, Rollout, RolloutDevice, RolloutState
from .device_states import Track, load_tracks, move, move_all, node_run_ended

__all__ = [
    "ENDED_ROLLOUT",
    "AttemptContext",
    "HealthPolicy",
    "catch_silence",
    "end_windows",
    "judge_verifying",
    "reached_target",
]

S = DeviceState

# What a device's row turns into when its rollout no longer offers anything.
ENDED_ROLLOUT = {
    RolloutState.STOPPED: S.CANCELLED,
    RolloutState.SUPERSEDED: S.SUPERSEDED,
}


@dataclass(frozen=True)
class HealthPolicy:
    window: float = 600.0  # ota.health.window: seconds verifying before updated
    max_logins: int = 3  # ota.health.max.logins: this many logins in the window fail it
    returns_within: float = 300.0  # ota.health.return: seconds from the download to a login

    def window_for(self, own: int | None) -> float:
        """The rollout's own healthWindow= where it set one (0: none), else the server's."""
        return self.window if own is None else own


@dataclass(frozen=True)
class AttemptContext:
    """What judging a device's open row at its login needs besides the row."""

    rollout_state: str
    target: str | None  # the rollout's build
    size: int  # its file's
    health_window: int | None  # the rollout's own, or None
    verifying_at: datetime | None
    health_logins: int


def reached_target(
    session: Session,
    track: Track,
    window: float,
    now: datetime,
    detail: str | None = None,
    *,
    here: tuple[int, int] | None = None,
) -> bool:
    """The device reported the rollout's build: verifying when one of this
    rollout's attempts took it there and the rollout has a window, else updated.
    `here`: the (node, run) holding the login's session. True if the row was
    still as `track` saw it."""
    if window > 0 and track.attempts > 0:
        return move(
            session, track, S.VERIFYING, now, detail, health_logins=1, health=None, **_held(here)
        )
    return move(session, track, S.UPDATED, now, detail)


def _held(here: tuple[int, int] | None) -> dict:
    """The columns naming the node run that holds a health login's session."""
    return {} if here is None else {"health_node_id": here[0], "health_node_run": here[1]}


def judge_verifying(
    session: Session,
    track: Track,
    context: AttemptContext,
    policy: HealthPolicy,
    reported_build: str | None,
    moved_on: bool,
    now: datetime,
    here: tuple[int, int] | None = None,
) -> bool:
    """A login of a device in its health window; True if the row was still as seen.

    `moved_on`: the build it reports is another rollout's target, taken
    through that rollout's attempt (the operator moved it on), not a rollback.
    `here`: the (node, run) holding this login's session.
    """
    since = now - (context.verifying_at or now)
    after = in_words(since.total_seconds())
    window = policy.window_for(context.health_window)
    if since.total_seconds() >= window:
        # Past its window, before the sweep ended it: passed, and this login is
        # judged as any updated device's (a revert re-offers, lifecycle.py).
        detail = f"passed its health window ({in_words(window)})"
        return move(session, track, S.UPDATED, now, detail, health=HealthOutcome.PASSED)
    if reported_build and context.target is not None and reported_build != context.target:
        if moved_on:
            return move(
                session,
                track,
                S.UPDATED,
                now,
                f"went on to build {reported_build} of another rollout inside its health window",
            )
        reason = f"rollback: came back with build {reported_build} {after} after the update"
        if context.rollout_state in ENDED_ROLLOUT:
            return move(session, track, ENDED_ROLLOUT[context.rollout_state], now, reason)
        return _fail(session, track, HealthOutcome.ROLLBACK, reason, now)
    if node_run_ended(
        session, track.id, RolloutDevice.health_node_id, RolloutDevice.health_node_run
    ):
        detail = (
            f"login {after} after the update, not counted: the server that held "
            "its last session has restarted since"
        )
        return move(session, track, S.VERIFYING, now, detail, **_held(here))
    logins = context.health_logins + 1
    if logins >= policy.max_logins:
        reason = f"crash loop: {logins} logins in {after} after the update"
        return _fail(session, track, HealthOutcome.CRASH_LOOP, reason, now, health_logins=logins)
    return move(
        session,
        track,
        S.VERIFYING,
        now,
        f"login {logins} inside its health window ({policy.max_logins} fail it)",
        health_logins=RolloutDevice.health_logins + 1,
        **_held(here),
    )


def _fail(
    session: Session, track: Track, health: str, reason: str, now: datetime, **values
) -> bool:
    """Failed for good: the firmware, not the attempt, is in question."""
    error = reason[:255]
    return move(session, track, S.FAILED, now, reason, last_error=error, health=health, **values)


def end_windows(session: Session, policy: HealthPolicy, now: datetime) -> int:
    """Verifying devices whose window passed without trouble: updated. Returns how many."""
    shortest = session.scalar(
        select(func.min(Rollout.health_window)).where(Rollout.health_window > 0)
    )
    bound = min(policy.window, shortest or policy.window)
    rows = load_tracks(
        session,
        Rollout.id == RolloutDevice.rollout_id,
        RolloutDevice.state == S.VERIFYING,
        RolloutDevice.verifying_at < now - timedelta(seconds=bound),
        extra=(Rollout.health_window, RolloutDevice.verifying_at),
        for_update=True,
    )
    passed: dict[float, list[Track]] = {}
    for track, own, verifying_at in rows:
        window = policy.window_for(own)
        if verifying_at < now - timedelta(seconds=window):
            passed.setdefault(window, []).append(track)
    moved = 0
    for window, tracks in passed.items():
        detail = f"passed its health window ({in_words(window)})"
        moved += move_all(session, tracks, S.UPDATED, now, detail, health=HealthOutcome.PASSED)
    return moved


def catch_silence(session: Session, policy: HealthPolicy, now: datetime) -> int:
    """Devices that downloaded the whole file and never logged in again within
    ota.health.return: failed ("never came back after the download"). Returns how many.

    Counted from the later of the download's end and the start of the longest
    running device process: a device cannot come back to a server that is down.
    """
    if policy.returns_within <= 0:
        return 0
    serving_since = session.scalar(
        select(func.min(Node.started_at)).where(Node.stopped_at.is_(None))
    )
    limit = now - timedelta(seconds=policy.returns_within)
    if serving_since is None or serving_since >= limit:
        return 0  # no device process has been up that long
    # A window of 0 (healthWindow=0, or ota.health.window=0 for the rollouts
    # that set none) judges no health: those attempts time out as before.
    own_window = Rollout.health_window > 0
    rows = load_tracks(
        session,
        Rollout.id == RolloutDevice.rollout_id,
        RolloutDevice.state == S.DOWNLOADED,
        RolloutDevice.downloaded_at < limit,
        own_window if policy.window <= 0 else or_(Rollout.health_window.is_(None), own_window),
        extra=(Rollout.state,),
    )
    reason = (
        "never came back after the download "
        f"(no login within ota.health.return, {in_words(policy.returns_within)})"
    )
    caught = 0
    for track, rollout_state in rows:
        if rollout_state in ENDED_ROLLOUT:
            caught += move(session, track, ENDED_ROLLOUT[rollout_state], now, reason)
        else:
            caught += _fail(session, track, HealthOutcome.SILENCE, reason, now)
    return caught
