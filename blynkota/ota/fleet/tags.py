"""Device tags: groups a campaign can aim at (`tag=`), a device list can filter by.

A tag is 1-24 characters of lowercase letters, digits, `.`, `_` and `-`
(given in any case, kept lowercase); a device has any number of them.
"""

import re

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.orm import Session

from ...store import DeviceTag, HotQuery
from ..errors import ProvisioningError

__all__ = ["TAG_RULE", "add_tag", "check_tag", "remove_tag", "tags_of"]

_TAG = re.compile(r"[a-z0-9._-]{1,24}")
TAG_RULE = "1 to 24 of letters, digits, '.', '_' and '-'"

_TAGS_OF = HotQuery(
    select(DeviceTag.device_id, DeviceTag.tag).where(
        DeviceTag.device_id.in_(bindparam("devices", expanding=True))
    )
)


def check_tag(text: str) -> str:
    """The tag as kept (lowercase); ProvisioningError if it is not one."""
    tag = text.strip().lower()
    if not _TAG.fullmatch(tag):
        raise ProvisioningError(f"A tag is {TAG_RULE}, not {text[:40]!r}.")
    return tag


def tags_of(session, device_ids) -> dict[int, frozenset[str]]:
    """Each device's tags (devices without any are left out): one query for a batch."""
    found: dict[int, set[str]] = {}
    ids = sorted(set(device_ids))
    for start in range(0, len(ids), 5000):  # a whole fleet's list: under any IN-list limit
        for device_id, tag in _TAGS_OF.rows(session, devices=ids[start : start + 5000]):
            found.setdefault(device_id, set()).add(tag)
    return {device_id: frozenset(tags) for device_id, tags in found.items()}


def add_tag(session: Session, tag: str, device_ids: list[int]) -> int:
    """Tag these devices (those that have it already are left); how many gained it."""
    tag = check_tag(tag)
    have = set(
        session.scalars(
            select(DeviceTag.device_id).where(
                DeviceTag.tag == tag, DeviceTag.device_id.in_(device_ids)
            )
        )
    )
    new = sorted(set(device_ids) - have)
    if new:  # two at once: a duplicate key, and the unit of work runs again
        session.execute(insert(DeviceTag), [{"device_id": d, "tag": tag} for d in new])
    return len(new)


def remove_tag(session: Session, tag: str, device_ids: list[int]) -> int:
    tag = check_tag(tag)
    result = session.execute(
        delete(DeviceTag).where(DeviceTag.tag == tag, DeviceTag.device_id.in_(device_ids))
    )
    return result.rowcount
