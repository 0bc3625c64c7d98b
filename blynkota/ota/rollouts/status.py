"""What rollouts look like from outside: the JSON of /admin/ota/status and the CLI table.

Counts come from the `rollout_progress` view, the same numbers an operator
gets with `SELECT * FROM rollout_progress`.
"""

from sqlalchemy import case, func, or_, select, text
from sqlalchemy.orm import Session

from ...store import (
    Device,
    DeviceState,
    Node,
    Project,
    Rollout,
    RolloutDevice,
    RolloutScope,
    RolloutState,
    User,
    utcnow,
)
from ..firmware.catalog import identity_of, iso, served_path
from .candidates import target_of
from .guards import RolloutGuards, outcome
from .lifecycle import UpdateLifecycle
from .schedule import window_of
from .targeting import in_scope

__all__ = [
    "with_outlook",
    "fleet_overview",
    "online_per_node",
    "rollout_detail",
    "rollout_devices_page",
    "rollout_summaries",
]

_TIMESTAMPS = (
    "pending_at",
    "first_offered_at",
    "offered_at",
    "downloading_at",
    "downloaded_at",
    "verifying_at",
    "updated_at",
    "failed_at",
    "ended_at",
    "next_attempt_at",
)


def _target(session: Session, rollout: Rollout) -> str:
    scoped = _scope_target(session, rollout)
    return scoped if rollout.tag is None else f"{scoped} tagged {rollout.tag}"


def _scope_target(session: Session, rollout: Rollout) -> str:
    if rollout.scope == RolloutScope.DEVICE:
        return session.get(Device, rollout.device_id).token
    if rollout.scope == RolloutScope.PROJECT:
        project = session.get(Project, rollout.project_id)
        email = session.get(User, project.user_id).email
        return f"{email} / {project.name} (project {project.dash_id})"
    if rollout.scope == RolloutScope.USER:
        return session.get(User, rollout.user_id).email
    return "all devices"


def _reach(session: Session, rollout: Rollout) -> tuple[int | None, int | None]:
    """(devices the rollout's target names, how many of them were seen since it
    started: logged in, reported or left, or online now), for a running rollout
    of many devices. Its own rows count only the devices it has met, so a
    campaign whose devices have not logged in yet would otherwise read "0 of 0"."""
    if rollout.scope == RolloutScope.DEVICE or rollout.state not in RolloutState.RUNNING:
        return None, None
    seen = or_(Device.last_seen_at >= rollout.started_at, Device.node_id.is_not(None))
    query = select(func.count(Device.id), func.coalesce(func.sum(case((seen, 1), else_=0)), 0))
    scoped = in_scope(query, rollout.scope, target_of(rollout), rollout.tag)
    targeted, seen_count = session.execute(scoped).one()
    return int(targeted), int(seen_count)


def _reach_text(targeted: int | None, seen: int | None) -> str | None:
    """The reach in words, as the CLI and the dashboard show it."""
    if targeted is None:
        return None
    return f"{targeted} targeted, {seen} seen " + ("yet" if seen == 0 else "since the start")


def rollout_summaries(
    session: Session, rollout_id: int | None = None, limit: int | None = None
) -> list[dict]:
    """Newest first: every rollout, one (`rollout_id`), or the newest `limit`."""
    query = select(Rollout).order_by(Rollout.id.desc())
    if rollout_id is not None:
        query = query.where(Rollout.id == rollout_id)
    if limit is not None:
        query = query.limit(limit)
    rollouts = session.scalars(query).all()
    progress = {
        row["rollout_id"]: row
        for row in session.execute(text("SELECT * FROM rollout_progress")).mappings()
    }

    summaries, now = [], utcnow()
    for rollout in rollouts:
        counts = progress.get(rollout.id, {})
        targeted, seen = _reach(session, rollout)
        window = window_of(rollout.window_start, rollout.window_end, rollout.window_tz)
        running = rollout.state in RolloutState.LIVE
        summaries.append(
            {
                "id": rollout.id,
                "scope": rollout.scope,
                "target": _target(session, rollout),
                "firmware": {
                    "name": rollout.firmware.name,
                    "path": served_path(rollout.firmware.name),
                    "build": rollout.firmware.build,
                    "original_name": rollout.firmware.original_name,
                    "chip": rollout.firmware.chip,
                    **identity_of(rollout.firmware),
                },
                "allow_downgrade": rollout.allow_downgrade,
                "tag": rollout.tag,
                "state": rollout.state,
                "started_by": rollout.started_by,
                "started_at": iso(rollout.started_at),
                "stopped_by": rollout.stopped_by,
                "stopped_at": iso(rollout.stopped_at),
                "superseded_by": rollout.superseded_by_id,
                "pause_reason": rollout.pause_reason,
                "push_online": rollout.push_online,
                "percent": rollout.percent,
                "waves": [int(share) for share in rollout.waves.split(",")]
                if rollout.waves
                else None,
                "success_percent": rollout.success_percent,
                "device_count": int(counts.get("devices") or 0),
                # A campaign's reach (None for one device, or once it has ended).
                "targeted": targeted,
                "seen": seen,
                "reach": _reach_text(targeted, seen),
                "outcome": outcome(counts) if rollout.state == RolloutState.COMPLETE else None,
                # startAt= and window= (schedule.py): when it starts, when it offers.
                "start_at": iso(rollout.start_at),
                "window": window.text if window else None,
                "window_outlook": window.outlook(now) if window and running else None,
                "counts": {state: int(counts.get(state) or 0) for state in DeviceState.ALL},
                "already_up_to_date": int(counts.get("already_up_to_date") or 0),
                # Devices that came back on another build after updating, at least once.
                "reverted": int(counts.get("reverted") or 0),
            }
        )
    return summaries


def _device_row(row: RolloutDevice, token: str, name: str) -> dict:
    return {
        "token": token,
        "name": name,
        "state": row.state,
        "attempts": row.attempts,
        "reverts": row.reverts,
        "health": row.health,
        "health_logins": row.health_logins,
        "last_error": row.last_error,
        "bytes_sent": row.bytes_sent,
        "already_up_to_date": row.already_current,
        "bucket": row.cohort_bucket,
        "wave": row.wave,
        **{stamp: iso(getattr(row, stamp)) for stamp in _TIMESTAMPS},
    }


def _devices_of(rollout_id: int):
    return (
        select(RolloutDevice, Device.token, Device.name)
        .join(Device, Device.id == RolloutDevice.device_id)
        .where(RolloutDevice.rollout_id == rollout_id)
    )


def rollout_detail(session: Session, rollout_id: int) -> dict | None:
    summaries = rollout_summaries(session, rollout_id)
    if not summaries:
        return None
    rows = session.execute(_devices_of(rollout_id).order_by(RolloutDevice.id)).all()
    detail = summaries[0]
    detail["devices"] = [_device_row(*row) for row in rows]
    return detail


def rollout_devices_page(
    session: Session, rollout_id: int, state: str | None, offset: int, limit: int
) -> tuple[list[dict], int]:
    """One page of a rollout's devices (in a state, if given), and how many there are."""
    query = _devices_of(rollout_id)
    if state is not None:
        query = query.where(RolloutDevice.state == state)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.execute(query.order_by(RolloutDevice.id).offset(offset).limit(limit)).all()
    return [_device_row(*row) for row in rows], total


def online_per_node(session: Session) -> list[tuple[str, int]]:
    """(node name, devices logged in there), by name."""
    return session.execute(
        select(Node.name, func.count(Device.id))
        .join(Device, Device.node_id == Node.id)
        .where(Device.online_since.is_not(None))
        .group_by(Node.name)
        .order_by(Node.name)
    ).all()


def fleet_overview(session: Session) -> dict:
    """Devices online per node, and the builds the fleet reports, each with the
    firmware version, type and library version reported with it (and how many
    of its devices are online)."""
    online = online_per_node(session)
    reported = (Device.build, Device.fw_version, Device.fw_type, Device.lib_version)
    builds = session.execute(
        select(*reported, func.count(Device.id), func.count(Device.online_since))
        .group_by(*reported)
        .order_by(func.count(Device.id).desc())
    ).all()
    return {
        "devices": sum(row[4] for row in builds),
        "online": sum(row[5] for row in builds),
        "nodes": [{"node": node, "online": count} for node, count in online],
        "builds": [
            {
                "build": build,
                "fw_version": fw_version,
                "fw_type": fw_type,
                "lib_version": lib_version,
                "devices": count,
                "online": online_count,
            }
            for build, fw_version, fw_type, lib_version, count, online_count in builds
        ],
    }


def with_outlook(
    session: Session, guards: RolloutGuards, lifecycle: UpdateLifecycle, summaries: list[dict]
) -> list[dict]:
    """Add the rollout's limits (its own, or the server's) and `next_wave`:
    why a running rollout with waves has not grown yet."""
    fleet, retries, health = guards.policy, lifecycle.policy, lifecycle.health
    for summary in summaries:
        rollout = session.get(Rollout, summary["id"])
        summary["limits"] = {
            "max_concurrent": fleet.concurrent_for(rollout.max_concurrent),
            "attempt_timeout": retries.timeout_for(rollout.attempt_timeout),
            "max_attempts": retries.attempts_for(rollout.max_attempts),
            "abort_ratio": fleet.abort_ratio_for(rollout.abort_ratio),
            "wave_delay": rollout.wave_delay,
            "health_window": health.window_for(rollout.health_window),
        }
        summary["next_wave"] = None
        if summary["waves"] and summary["state"] in RolloutState.RUNNING:
            summary["next_wave"] = guards.next_wave(session, rollout)[1]
    return summaries
