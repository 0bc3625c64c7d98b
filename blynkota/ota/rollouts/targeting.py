"""Who a campaign is aimed at: the user / project of `?user=&project=`, and for a
dry run, the devices it would take in now."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ...numbers import ROW_ID_MAX, whole_number
from ...store import Device, DeviceTag, Project, RolloutScope, User
from ..errors import Refused
from ..fleet.tags import tags_of
from .candidates import Candidate, RunningRollouts
from .compatibility import BoardReport

__all__ = [
    "campaign_target",
    "devices_in_scope",
    "devices_taken_in",
    "in_scope",
    "tokens_in_scope",
]


def campaign_target(
    session: Session, email: str | None, project_ref: str | None, tag: str | None = None
) -> tuple[str, int | None]:
    """(scope, target id) for the query parameters; Refused for unknown ones (a
    tag no device carries is a typo: refused, not a campaign to nobody)."""
    tagged = select(DeviceTag.id).where(DeviceTag.tag == tag).limit(1)
    if tag is not None and session.scalar(tagged) is None:
        raise Refused(f"No device is tagged {tag!r}.")
    if email is None:
        if project_ref is not None:
            raise Refused("The project parameter needs the user parameter too.")
        return RolloutScope.ALL, None
    user = session.scalar(select(User).where(func.lower(User.email) == email.lower()))
    if user is None:
        raise Refused("Requested user not found.")
    if project_ref is None:
        return RolloutScope.USER, user.id
    matches = session.scalars(
        select(Project).where(
            Project.user_id == user.id,
            (func.lower(Project.name) == project_ref.lower())
            | (Project.dash_id == _dash_id(project_ref)),
        )
    ).all()
    if not matches:
        raise Refused("Requested project not found.")
    if len(matches) > 1:
        ids = ", ".join(str(project.dash_id) for project in matches)
        raise Refused(f"Project name {project_ref!r} matches projects {ids}: give the project id.")
    return RolloutScope.PROJECT, matches[0].id


def in_scope(query, scope: str, target_id: int | None, tag: str | None = None):
    """`query` (on devices) joined to their projects and narrowed to the
    devices a rollout of `scope`, target and tag reaches."""
    query = query.join(Project, Project.id == Device.project_id)
    if tag is not None:
        query = query.where(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    if scope == RolloutScope.USER:
        return query.where(Project.user_id == target_id)
    if scope == RolloutScope.PROJECT:
        return query.where(Project.id == target_id)
    if scope == RolloutScope.DEVICE:
        return query.where(Device.id == target_id)
    return query


def devices_in_scope(
    session: Session, scope: str, target_id: int | None, tag: str | None = None
) -> int:
    """How many registered devices a campaign of `scope`, target and tag reaches."""
    return session.scalar(in_scope(select(func.count(Device.id)), scope, target_id, tag)) or 0


def tokens_in_scope(
    session: Session, scope: str, target_id: int | None, tag: str | None = None
) -> list[str]:
    """The tokens of every registered device a rollout of `scope`, target and tag reaches."""
    return list(session.scalars(in_scope(select(Device.token), scope, target_id, tag)).all())


def devices_taken_in(
    session: Session, candidate: Candidate, target_id: int | None
) -> tuple[list[dict], list[dict]]:
    """Devices in the candidate's scope that it would offer now (not yet stored),
    and those it would take in but never offer: their hardware cannot run it.

    Which rollout owns each device is judged in memory, on one read of the
    running rollouts, as enrolment does: not a query per device.
    """
    precedence = (RolloutScope.BY_PRECEDENCE.index(candidate.scope), candidate.tag is None)
    query = (
        in_scope(select(Device, Project, User), candidate.scope, target_id, candidate.tag)
        .join(User, User.id == Project.user_id)
        .order_by(Device.id)
    )
    rows = session.execute(query).all()
    running = RunningRollouts(session)
    tags = tags_of(session, [device.id for device, _, _ in rows]) if running.tagged else {}
    devices, incompatible = [], []
    for device, project, user in rows:
        owner = running.rollout_for(
            device_id=device.id,
            project_id=project.id,
            user_id=user.id,
            tags=tags.get(device.id, frozenset()),
        )
        if owner is not None and _rank(owner) < precedence:
            continue  # a more specific rollout keeps this device
        taking_part, _, wave = candidate.takes_part(device.token)
        board = BoardReport(device.hardware, device.fw_type, device.fw_version, device.build)
        if taking_part and candidate.may_offer(device.build) and not candidate.runs_on(board):
            entry = {
                "token": device.token,
                "user": user.email,
                "project": project.name,
                "build": device.build,
                "hardware": device.hardware,
                "fw_version": device.fw_version,
                "fw_type": device.fw_type,
                "online": device.node_id is not None,
                "wave": wave,
            }
            unfit = candidate.unfit_for(board)
            if unfit is None:
                devices.append(entry)
            else:
                incompatible.append({**entry, "reason": unfit})
    return devices, incompatible


def _rank(candidate: Candidate) -> tuple[int, bool]:
    return RolloutScope.BY_PRECEDENCE.index(candidate.scope), candidate.tag is None


def _dash_id(project_ref: str) -> int:
    """The project's id in the Blynk app if `project_ref` can be one; -1 matches none."""
    number = whole_number(project_ref, high=ROW_ID_MAX)
    return -1 if number is None else number
