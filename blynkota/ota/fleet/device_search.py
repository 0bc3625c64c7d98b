"""Finding devices: the device list's filters and search, a page at a time.

One search box matches a token's beginning, a log tag (`t:…`, the token's
tag as the server's log shows it), a tag, or part of a device's name, its
user, its project, its build or its firmware version; filters narrow by
tag, user, project, build and whether it is online.
"""

from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ...logsafe import token_tag
from ...store import Device, DeviceTag, Project, User
from .tags import tags_of

__all__ = ["DeviceFilter", "find_devices"]


@dataclass(frozen=True)
class DeviceFilter:
    search: str | None = None
    tag: str | None = None
    user: str | None = None
    project: str | None = None
    build: str | None = None
    online: bool | None = None
    device_id: int | None = None  # one device, by its row


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _narrowed(query, found: DeviceFilter, session: Session):
    if found.device_id is not None:
        query = query.where(Device.id == found.device_id)
    if found.tag:
        query = query.where(
            Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == found.tag.lower()))
        )
    if found.user:
        query = query.where(func.lower(User.email) == found.user.lower())
    if found.project:
        query = query.where(func.lower(Project.name) == found.project.lower())
    if found.build:
        query = query.where(Device.build == found.build)
    if found.online is not None:
        query = query.where(Device.online_since.is_not(None) if found.online
                            else Device.online_since.is_(None))  # fmt: skip
    text = (found.search or "").strip()
    if text.startswith("t:"):
        # A log tag is a hash of the token: compared in memory, on the tokens.
        ids = [row_id for row_id, token in session.execute(select(Device.id, Device.token))
               if token_tag(token) == text]  # fmt: skip
        query = query.where(Device.id.in_(ids or [0]))
    elif text:
        like = _like(text)
        query = query.where(
            or_(
                Device.token.startswith(text, autoescape=True),
                func.lower(Device.name).like(like, escape="\\"),
                func.lower(User.email).like(like, escape="\\"),
                func.lower(Project.name).like(like, escape="\\"),
                func.lower(Device.build).like(like, escape="\\"),
                func.lower(Device.fw_version).like(like, escape="\\"),
                Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == text.lower())),
            )
        )
    return query


def find_devices(
    session: Session, found: DeviceFilter, offset: int = 0, limit: int | None = None
) -> tuple[list[tuple[Device, Project, User, tuple[str, ...]]], int]:
    """(device, project, user, its tags) for a page of the matching devices, by
    user, project and id; and how many match."""
    base = select(Device, Project, User).join(Project, Device.project_id == Project.id)
    base = _narrowed(base.join(User, Project.user_id == User.id), found, session)
    total = session.scalar(select(func.count()).select_from(base.subquery()))
    query = base.order_by(User.email, Project.dash_id, Device.id).offset(offset)
    rows = session.execute(query if limit is None else query.limit(limit)).all()
    tags = tags_of(session, [device.id for device, _, _ in rows]) if rows else {}
    return [(d, p, u, tuple(sorted(tags.get(d.id, ())))) for d, p, u in rows], total
