"""The per-device update lifecycle: every allowed transition, in one table.

A device's state in a rollout is derived from what the server itself sees
(offers written, downloads served, the build reported at login); devices
report nothing else. Every change goes through `move`, which refuses a
transition not in the table and appends it to the event log.

Many processes change these rows at once, so a move is one conditional
UPDATE: `... WHERE id = :id AND state = :seen AND attempts = :seen_attempts`.
Its row count says whether it happened; when another process got there first
nothing is written (no event either) and the caller reads the row again. A
late "whole file written" can therefore never overwrite "updated". Rows are
handled as `Track` snapshots, never as ORM objects, so nothing writes a row
behind the condition's back.
"""

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from ...store import DeviceState, HotQuery, Node, RolloutDevice, RolloutEvent, insert_many

__all__ = [
    "ConcurrentChange",
    "devices_in_flight",
    "IllegalDeviceTransition",
    "TRANSITIONS",
    "Track",
    "load_tracks",
    "log_events",
    "move",
    "move_all",
    "node_run_ended",
    "offer_all",
    "run_tracks_query",
    "enter_all",
    "start_tracking",
    "tracks_query",
]

log = logging.getLogger(__name__)

S = DeviceState

# (from, to) -> why it happens. None as "from" is a device entering a rollout.
TRANSITIONS: dict[tuple[str | None, str], str] = {
    (None, S.PENDING): "targeted",
    (None, S.UPDATED): "already on the rollout's build when first seen",
    (None, S.INCOMPATIBLE): "its reported hardware cannot run the image",
    (S.PENDING, S.INCOMPATIBLE): "reported hardware that cannot run the image",
    (S.INCOMPATIBLE, S.PENDING): "reported hardware that can run the image",
    (S.FAILED, S.PENDING): "retried by an operator: a fresh set of attempts",
    (S.PENDING, S.OFFERED): "ota command written",
    (S.PENDING, S.UPDATED): "reported the rollout's build",
    (S.PENDING, S.FAILED): "the device cannot take the ota command",
    (S.PENDING, S.CANCELLED): "rollout stopped",
    (S.PENDING, S.SUPERSEDED): "rollout replaced",
    (S.OFFERED, S.DOWNLOADING): "download request arrived",
    (S.DOWNLOADING, S.DOWNLOADING): "download restarted or cut short",
    (S.DOWNLOADED, S.DOWNLOADING): "downloaded again",
    (S.DOWNLOADING, S.DOWNLOADED): "whole file written",
    (S.UPDATED, S.PENDING): "reverted: reported another build after updating",
    (S.UPDATED, S.FAILED): "reverted after updating, no attempts left",
}
# The health window (health.py): a device that reported the rollout's build
# after an attempt verifies it before it counts as updated.
TRANSITIONS.update(
    {
        (S.PENDING, S.VERIFYING): "reported the rollout's build after an attempt: verifying",
        (S.VERIFYING, S.VERIFYING): "logged in again inside its health window",
        (S.VERIFYING, S.UPDATED): "passed its health window",
        (S.VERIFYING, S.FAILED): "failed its health window",
        (S.VERIFYING, S.CANCELLED): "moved to another build in a stopped rollout",
        (S.VERIFYING, S.SUPERSEDED): "moved to another build in a replaced rollout",
    }
)
for _in_flight in DeviceState.IN_FLIGHT:
    TRANSITIONS[(_in_flight, S.UPDATED)] = "logged in reporting the rollout's build"
    TRANSITIONS[(_in_flight, S.VERIFYING)] = "logged in reporting the rollout's build: verifying"
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
    S.VERIFYING: "verifying_at",
    S.UPDATED: "updated_at",
    S.FAILED: "failed_at",
    S.CANCELLED: "ended_at",
    S.SUPERSEDED: "ended_at",
    S.INCOMPATIBLE: "ended_at",
}


# States whose stamp says when they were entered, not when the row last moved
# within them: a health window runs from the first login on the new build.
_STAMPED_ONCE = {S.VERIFYING}

# Moves into these (and out of updated) are logged, besides the event.
_LOGGED = {S.VERIFYING, S.UPDATED, S.FAILED}

# The stamps a device can enter a rollout with: every row of one INSERT names them all.
_ENTRY_STAMPS = sorted(
    {_STAMP[after] for before, after in TRANSITIONS if before is None} - {"pending_at"}
)


class IllegalDeviceTransition(RuntimeError):
    pass


class ConcurrentChange(RuntimeError):
    """Rows changed under a lock that should have kept them: the unit of work is void."""


@dataclass
class Track:
    """A snapshot of one rollout_devices row: what a decision was based on."""

    id: int
    rollout_id: int
    device_id: int
    state: str
    attempts: int
    bytes_sent: int | None
    next_attempt_at: datetime | None
    first_offered_at: datetime | None


_TRACK_COLUMNS = (
    RolloutDevice.id,
    RolloutDevice.rollout_id,
    RolloutDevice.device_id,
    RolloutDevice.state,
    RolloutDevice.attempts,
    RolloutDevice.bytes_sent,
    RolloutDevice.next_attempt_at,
    RolloutDevice.first_offered_at,
)


def load_tracks(session: Session, *conditions, extra=(), for_update: bool = False) -> list:
    """Snapshots of the rows matching `conditions`, each followed by `extra` columns."""
    query = select(*_TRACK_COLUMNS, *extra).where(*conditions).order_by(RolloutDevice.id)
    if for_update:
        query = query.with_for_update()
    return _snapshots(session.execute(query).all(), bool(extra))


def tracks_query(*conditions, extra=(), for_update: bool = False) -> HotQuery:
    """`load_tracks`'s query on the table's columns, to build once for a hot path
    (with bindparams) and run with `run_tracks_query`, on the driver's cursor."""
    table = RolloutDevice.__table__
    columns = [table.c[column.key] for column in _TRACK_COLUMNS]
    query = select(*columns, *extra).where(*conditions).order_by(table.c.id)
    return HotQuery(query.with_for_update() if for_update else query)


def run_tracks_query(session: Session | Connection, query: HotQuery, parameters: dict) -> list:
    with_extra = len(query.statement.selected_columns) > len(_TRACK_COLUMNS)
    return _snapshots(query.rows(session, **parameters), with_extra)


def _snapshots(rows, with_extra: bool) -> list:
    width = len(_TRACK_COLUMNS)
    if not with_extra:
        return [Track(*row) for row in rows]
    return [(Track(*row[:width]), *row[width:]) for row in rows]


def _event(track: Track, before: str | None, after: str, detail: str | None, at: datetime):
    return _event_of(track.rollout_id, track.device_id, before, after, detail, at)


def _event_of(rollout_id, device_id, before, after, detail, at) -> dict:
    return {
        "rollout_id": rollout_id,
        "device_id": device_id,
        "from_state": before,
        "to_state": after,
        "at": at,
        "detail": (detail or TRANSITIONS[(before, after)])[:255],
    }


_DEVICES_IN_FLIGHT = HotQuery(
    select(RolloutDevice.__table__.c.device_id)
    .where(
        RolloutDevice.__table__.c.device_id.in_(bindparam("devices", expanding=True)),
        RolloutDevice.__table__.c.state.in_(S.IN_FLIGHT),
    )
    .distinct()
)


def devices_in_flight(session: Session, device_ids) -> set[int]:
    """Which of these devices have an open attempt, in any rollout.

    Asked under the offer-slots lock, once per batch of offers: a device has
    at most one `ota` in flight, however many uploads name it.
    """
    rows = _DEVICES_IN_FLIGHT.rows(session, devices=sorted(set(device_ids)))
    return {device_id for (device_id,) in rows}


def log_events(session: Session, events: list[dict]) -> None:
    if events:
        # On the table: the ORM's bulk path costs more than the rows themselves.
        insert_many(session, RolloutEvent.__table__, events)


def start_tracking(
    session: Session,
    *,
    rollout_id: int,
    device_id: int,
    state: str,
    at: datetime,
    detail: str | None = None,
    **values,
) -> Track:
    """A device enters a rollout. A second entry of the same pair is a duplicate key."""
    if (None, state) not in TRANSITIONS:
        raise IllegalDeviceTransition(f"a device cannot enter a rollout as {state!r}")
    columns = {
        "rollout_id": rollout_id,
        "device_id": device_id,
        "state": state,
        "attempts": 0,
        "already_current": state == S.UPDATED,
        "pending_at": at,
        _STAMP[state]: at,
        **values,
    }
    result = session.execute(insert(RolloutDevice).values(**columns))
    track = Track(result.inserted_primary_key[0], rollout_id, device_id, state, 0, None, None, None)
    log_events(session, [_event(track, None, state, detail, at)])
    return track


def enter_all(session: Session, entries: list[dict], at: datetime) -> None:
    """Devices enter rollouts, in one INSERT: each entry names rollout_id,
    device_id, state, detail (for the event) and further columns.

    A pair already there is a duplicate key: the unit of work runs again.
    """
    if not entries:
        return
    rows, events = [], []
    for entry in entries:
        values = dict(entry)
        detail, state = values.pop("detail"), values["state"]
        if (None, state) not in TRANSITIONS:
            raise IllegalDeviceTransition(f"a device cannot enter a rollout as {state!r}")
        rows.append(
            {
                "attempts": 0,
                "reverts": 0,
                "health_logins": 0,
                "already_current": state == S.UPDATED,
                "pending_at": at,
                **{stamp: (at if stamp == _STAMP[state] else None) for stamp in _ENTRY_STAMPS},
                **values,
            }
        )
        events.append(_event_of(values["rollout_id"], values["device_id"], None, state, detail, at))
    insert_many(session, RolloutDevice.__table__, rows)
    log_events(session, events)


def move(
    session: Session,
    track: Track,
    state: str,
    at: datetime,
    detail: str | None = None,
    **values,
) -> bool:
    """Move `track` to `state` if the row is still as the snapshot saw it; True if it moved.

    `values` are further columns written in the same UPDATE. On success the
    snapshot is brought up to date.
    """
    before = track.state
    if (before, state) not in TRANSITIONS:
        raise IllegalDeviceTransition(f"{before!r} -> {state!r} for device {track.device_id}")
    changes = {"state": state, **values}
    if before != state or state not in _STAMPED_ONCE:
        changes[_STAMP[state]] = at
    if state in (S.UPDATED, S.VERIFYING):
        changes.setdefault("last_error", None)  # stale once updated; the events keep it
    result = session.execute(
        update(RolloutDevice)
        .where(
            RolloutDevice.id == track.id,
            RolloutDevice.state == before,
            RolloutDevice.attempts == track.attempts,
        )
        .values(**changes)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    for name, value in changes.items():
        if hasattr(track, name):
            setattr(track, name, value)
    log_events(session, [_event(track, before, state, detail, at)])
    if before != state and (state in _LOGGED or before == S.UPDATED):
        log.info(
            "rollout %d: device %d %s -> %s%s",
            track.rollout_id,
            track.device_id,
            before,
            state,
            f": {detail}" if detail else "",
            extra={"rollout": track.rollout_id},
        )
    return True


def offer_all(
    session: Session, offers: list[tuple[Track, str]], at: datetime, by: tuple[int, int]
) -> None:
    """pending -> offered for rows locked with `load_tracks(..., for_update=True)`,
    one attempt used each, in one statement; `offers` pairs each row with its URL,
    `by` is the offering node's (id, run number).

    As in `move_all`, a row that moved anyway voids the whole transaction.
    """
    if not offers:
        return
    for track, _ in offers:
        if track.state != S.PENDING:
            raise IllegalDeviceTransition(f"{track.state!r} -> 'offered'")
    table = RolloutDevice.__table__
    for start in range(0, len(offers), 500):
        chunk = offers[start : start + 500]
        result = session.execute(
            update(table)
            .where(table.c.id.in_([track.id for track, _ in chunk]), table.c.state == S.PENDING)
            .values(
                state=S.OFFERED,
                offered_at=at,
                attempts=table.c.attempts + 1,
                first_offered_at=func.coalesce(table.c.first_offered_at, at),
                next_attempt_at=None,
                bytes_sent=None,
                offer_node_id=by[0],
                offer_node_run=by[1],
            )
        )
        if result.rowcount != len(chunk):
            raise ConcurrentChange(
                f"{len(chunk) - result.rowcount} row(s) left pending while locked"
            )
        events = []
        for track, url in chunk:
            detail = f"attempt {track.attempts + 1}: {url}"
            events.append(_event(track, S.PENDING, S.OFFERED, detail, at))
            track.state, track.attempts = S.OFFERED, track.attempts + 1
            track.first_offered_at = track.first_offered_at or at
        log_events(session, events)


def move_all(
    session: Session, tracks: list[Track], state: str, at: datetime, detail: str, **values
) -> int:
    """Move rows locked with `load_tracks(..., for_update=True)`, in one statement.

    The row locks (MySQL) or the single writer (SQLite) keep them as loaded;
    should one have moved anyway, the whole transaction is rolled back rather
    than leave a change without its event.
    """
    by_state: dict[str, list[Track]] = {}
    for track in tracks:
        if (track.state, state) not in TRANSITIONS:
            raise IllegalDeviceTransition(f"{track.state!r} -> {state!r}")
        by_state.setdefault(track.state, []).append(track)
    moved = 0
    for before, group in by_state.items():
        for start in range(0, len(group), 500):
            chunk = group[start : start + 500]
            result = session.execute(
                update(RolloutDevice)
                .where(RolloutDevice.id.in_([t.id for t in chunk]), RolloutDevice.state == before)
                .values(state=state, **{_STAMP[state]: at}, **values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != len(chunk):
                raise ConcurrentChange(
                    f"{len(chunk) - result.rowcount} row(s) left {before!r} while locked"
                )
            log_events(session, [_event(t, before, state, detail, at) for t in chunk])
            for track in chunk:
                track.state = state
            moved += len(chunk)
    return moved


def node_run_ended(session: Session, row_id: int, node_column, run_column) -> bool:
    """Whether the node run a row recorded (`node_column`, `run_column`: the
    offer's, the last health login's) has ended since: the node stopped, or
    runs again. False where the row recorded none (rows from before runs were)."""
    row = session.execute(
        select(Node.runs, Node.stopped_at, run_column)
        .join(Node, Node.id == node_column)
        .where(RolloutDevice.id == row_id)
    ).first()
    if row is None or row[2] is None:
        return False
    return row.stopped_at is not None or row.runs != row[2]
