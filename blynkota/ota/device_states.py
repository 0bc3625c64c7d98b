"""The per-device update lifecycle: every allowed transition, in one table.

A device's state in a rollout is derived from what the server itself sees
(offers written, downloads served, the build reported at login); devices
report nothing else. Every change goes through `move`, which refuses a
transition not in the table and appends it to the event log.
"""

from datetime import datetime

from sqlalchemy.orm import Session

from ..store import DeviceState, RolloutDevice, RolloutEvent

__all__ = ["IllegalDeviceTransition", "TRANSITIONS", "move", "start_tracking"]

S = DeviceState

# (from, to) -> why it happens. None as "from" is a device entering a rollout.
TRANSITIONS: dict[tuple[str | None, str], str] = {
    (None, S.PENDING): "targeted",
    (None, S.UPDATED): "already on the rollout's build when first seen",
    (S.PENDING, S.OFFERED): "ota command written",
    (S.PENDING, S.UPDATED): "reported the rollout's build",
    (S.PENDING, S.CANCELLED): "rollout stopped",
    (S.PENDING, S.SUPERSEDED): "rollout replaced",
    (S.OFFERED, S.DOWNLOADING): "download request arrived",
    (S.DOWNLOADING, S.DOWNLOADING): "download restarted or cut short",
    (S.DOWNLOADED, S.DOWNLOADING): "downloaded again",
    (S.DOWNLOADING, S.DOWNLOADED): "whole file written",
}
for _in_flight in DeviceState.IN_FLIGHT:
    TRANSITIONS[(_in_flight, S.UPDATED)] = "logged in reporting the rollout's build"
    TRANSITIONS[(_in_flight, S.PENDING)] = "attempt failed, retry after the backoff"
    TRANSITIONS[(_in_flight, S.FAILED)] = "attempt failed, no attempts left"
    TRANSITIONS[(_in_flight, S.CANCELLED)] = "attempt ended in a stopped rollout"
    TRANSITIONS[(_in_flight, S.SUPERSEDED)] = "attempt ended in a replaced rollout"

# The timestamp column each state sets when entered.
_STAMP = {
    S.PENDING: "pending_at",
    S.OFFERED: "offered_at",
    S.DOWNLOADING: "downloading_at",
    S.DOWNLOADED: "downloaded_at",
    S.UPDATED: "updated_at",
    S.FAILED: "failed_at",
    S.CANCELLED: "ended_at",
    S.SUPERSEDED: "ended_at",
}


class IllegalDeviceTransition(RuntimeError):
    pass


def _event(row: RolloutDevice, before: str | None, detail: str | None, at: datetime):
    return RolloutEvent(
        rollout_id=row.rollout_id,
        device_id=row.device_id,
        from_state=before,
        to_state=row.state,
        at=at,
        detail=(detail or TRANSITIONS[(before, row.state)])[:255],
    )


def start_tracking(
    session: Session,
    *,
    rollout_id: int,
    device_id: int,
    state: str,
    at: datetime,
    detail: str | None = None,
) -> RolloutDevice:
    if (None, state) not in TRANSITIONS:
        raise IllegalDeviceTransition(f"a device cannot enter a rollout as {state!r}")
    row = RolloutDevice(
        rollout_id=rollout_id,
        device_id=device_id,
        state=state,
        pending_at=at,
        already_current=state == S.UPDATED,
    )
    setattr(row, _STAMP[state], at)
    session.add(row)
    session.flush()
    session.add(_event(row, None, detail, at))
    return row


def move(
    session: Session, row: RolloutDevice, state: str, at: datetime, detail: str | None = None
) -> None:
    before = row.state
    if (before, state) not in TRANSITIONS:
        raise IllegalDeviceTransition(f"{before!r} -> {state!r} for device {row.device_id}")
    row.state = state
    setattr(row, _STAMP[state], at)
    session.add(_event(row, before, detail, at))
