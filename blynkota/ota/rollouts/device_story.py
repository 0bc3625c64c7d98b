"""One device as the dashboard's device page shows it: what it reported, its
connection, its tags, and every rollout and attempt it was in, with reasons."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from ...logsafe import token_tag
from ...store import Device, Firmware, Node, Project, Rollout, RolloutDevice, RolloutEvent, User
from ..firmware.catalog import iso, title_of
from ..fleet.tags import tags_of

__all__ = ["EVENTS_SHOWN", "device_story"]

EVENTS_SHOWN = 100  # a device's newest events on its page


def device_story(session: Session, device_id: int) -> dict | None:
    found = session.execute(
        select(Device, Project, User)
        .join(Project, Project.id == Device.project_id)
        .join(User, User.id == Project.user_id)
        .where(Device.id == device_id)
    ).first()
    if found is None:
        return None
    device, project, user = found
    node = session.get(Node, device.node_id) if device.node_id is not None else None
    rollouts = session.execute(
        select(RolloutDevice, Rollout, Firmware)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .join(Firmware, Firmware.id == Rollout.firmware_id)
        .where(RolloutDevice.device_id == device_id)
        .order_by(RolloutDevice.rollout_id.desc())
    ).all()
    events = session.scalars(
        select(RolloutEvent)
        .where(RolloutEvent.device_id == device_id)
        .order_by(RolloutEvent.id.desc())
        .limit(EVENTS_SHOWN)
    ).all()
    return {
        "id": device.id,
        "log_tag": token_tag(device.token),
        "name": device.name,
        "user": user.email,
        "project": project.name,
        "tags": sorted(tags_of(session, [device.id]).get(device.id, ())),
        "reported": {
            "build": device.build,
            "fw_version": device.fw_version,
            "fw_type": device.fw_type,
            "lib_version": device.lib_version,
            "hardware": device.hardware,
            "heartbeat": device.heartbeat,
            "template": device.template_id,
        },
        "online_since": iso(device.online_since),
        "node": node.name if node is not None else None,
        "last_seen_at": iso(device.last_seen_at),
        "last_address": device.last_address,
        "rollouts": [
            {
                "rollout": rollout.id,
                "rollout_state": rollout.state,
                "firmware": title_of(firmware),
                "state": row.state,
                "attempts": row.attempts,
                "health": row.health,
                "last_error": row.last_error,
                "updated_at": iso(row.updated_at),
                "failed_at": iso(row.failed_at),
            }
            for row, rollout, firmware in rollouts
        ],
        "events": [
            {
                "at": iso(event.at),
                "rollout": event.rollout_id,
                "from": event.from_state,
                "to": event.to_state,
                "detail": event.detail,
            }
            for event in events
        ],
    }
