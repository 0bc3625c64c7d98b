"""Users, projects and devices: provisioning, the Blynk import, and listings."""

import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ...logsafe import token_tag
from ...store import Database, Device, Project, User
from ..errors import ProvisioningError
from .blynk_data import TOKEN_RULE, BlynkUser, is_token
from .device_search import DeviceFilter, find_devices
from .tags import add_tag, remove_tag

__all__ = [
    "UNKNOWN_OWNER",
    "adopt_device",
    "DeviceRow",
    "FleetRegistry",
    "ImportCounts",
    "NewDevice",
    "ProvisioningError",
    "new_token",
]


TEXT_LIMIT = 255  # characters of an e-mail, a project or a device name (their columns)


def new_token() -> str:
    # 32 characters of hex, as the Blynk server generates them (128 random bits).
    return secrets.token_hex(16)


@dataclass(frozen=True)
class DeviceRow:
    token: str
    name: str
    user: str
    project: str
    dash_id: int
    build: str | None
    fw_version: str | None
    fw_type: str | None
    lib_version: str | None
    hardware: str | None
    last_seen_at: datetime | None
    last_address: str | None
    online: bool
    tag: str  # what the server's log shows instead of the token
    tags: tuple[str, ...] = ()  # its groups (`devices tag`)
    id: int = 0  # its row's (the dashboard's device page)


@dataclass
class ImportCounts:
    users: int = 0
    projects: int = 0
    devices: int = 0
    updated: int = 0


def _user(session: Session, email: str) -> User:
    user = session.scalar(select(User).where(User.email == email))
    if user is None:
        user = User(email=email)
        session.add(user)
        session.flush()
    return user


@dataclass(frozen=True)
class NewDevice:
    """A device to provision: owner's e-mail, project name, device name, token (or None)."""

    email: str
    project: str
    name: str = ""
    token: str | None = None

    def check(self) -> None:
        """Bounded to the columns; a clear reason where not."""
        if not self.email or len(self.email) > TEXT_LIMIT or "@" not in self.email:
            raise ProvisioningError(f"{self.email!r} is not an e-mail address.")
        if not self.project.strip() or len(self.project) > TEXT_LIMIT:
            raise ProvisioningError(f"A project name is 1 to {TEXT_LIMIT} characters.")
        if len(self.name) > TEXT_LIMIT:
            raise ProvisioningError(f"A device name is at most {TEXT_LIMIT} characters.")
        if self.token is not None and not is_token(self.token):
            raise ProvisioningError(f"A token is {TOKEN_RULE}.")


# Where a device the upstream Blynk server accepted, and blynkota did not know,
# waits for its owner (relay mode): `import-blynk` moves it to its project.
UNKNOWN_OWNER = "owner-unknown@relay.blynkota"
UNKNOWN_PROJECT = "Relayed, owner unknown (run import-blynk)"


def adopt_device(session: Session, token: str) -> tuple[int, int, int]:
    """The (device id, project id, user id) of `token`, its row made under the
    unknown owner if blynkota did not know it. Two nodes adopting one token at
    once collide on the unique token, and the loser's unit of work runs again."""
    found = session.execute(
        select(Device.id, Device.project_id, Project.user_id)
        .join(Project, Project.id == Device.project_id)
        .where(Device.token == token)
    ).first()
    if found is not None:
        return tuple(found)
    user = _user(session, UNKNOWN_OWNER)
    project = session.scalar(
        select(Project).where(Project.user_id == user.id, Project.name == UNKNOWN_PROJECT)
    )
    if project is None:
        project = Project(user_id=user.id, dash_id=0, name=UNKNOWN_PROJECT)
        session.add(project)
        session.flush()
    device = Device(project_id=project.id, name="", token=token)
    session.add(device)
    session.flush()
    return device.id, project.id, user.id


class FleetRegistry:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add_device(
        self, email: str, project_name: str, *, name: str = "", token: str | None = None
    ) -> str:
        return self.add_devices([NewDevice(email, project_name, name, token)])[0]

    def add_devices(self, devices: list["NewDevice"]) -> list[str]:
        """Add every device in one transaction, or none (ProvisioningError names the first
        that cannot be added, by its position from 1); their tokens, in order."""

        def work(session: Session) -> list[str]:
            tokens, given = [], set()  # a set: a large CSV is checked in linear time
            projects: dict[tuple[str, str], Project] = {}
            for number, device in enumerate(devices, start=1):
                where = f"device {number}: " if len(devices) > 1 else ""
                try:
                    if device.token is not None and device.token in given:
                        raise ProvisioningError(f"Token {device.token} is given twice.")
                    tokens.append(self._add(session, device, projects))
                    given.add(tokens[-1])
                except ProvisioningError as error:
                    raise ProvisioningError(f"{where}{error}") from None
            return tokens

        # Run again from the start if it lost a race (or SQLite was locked).
        return self._db.run(work)

    @staticmethod
    def _add(session: Session, device: "NewDevice", projects: dict) -> str:
        device.check()
        token = device.token or new_token()
        if session.scalar(select(Device.id).where(Device.token == token)) is not None:
            raise ProvisioningError(f"Token {token} already belongs to a device.")
        key = (device.email, device.project.lower())
        project = projects.get(key)
        if project is None:
            user = _user(session, device.email)
            project = session.scalar(
                select(Project).where(
                    Project.user_id == user.id,
                    func.lower(Project.name) == device.project.lower(),
                )
            )
            if project is None:
                next_id = session.scalar(
                    select(func.coalesce(func.max(Project.dash_id), 0) + 1).where(
                        Project.user_id == user.id
                    )
                )
                project = Project(user_id=user.id, dash_id=next_id, name=device.project)
                session.add(project)
                session.flush()
            projects[key] = project
        session.add(Device(project_id=project.id, name=device.name, token=token))
        return token

    def import_blynk(self, users: list[BlynkUser]) -> ImportCounts:
        """Insert or update every user, project and device; tokens are kept as they are."""

        def work(session: Session) -> ImportCounts:
            counts = ImportCounts()
            for blynk_user in users:
                known = session.scalar(select(User).where(User.email == blynk_user.email))
                user = known or _user(session, blynk_user.email)
                counts.users += known is None
                for blynk_project in blynk_user.projects:
                    project = session.scalar(
                        select(Project).where(
                            Project.user_id == user.id, Project.dash_id == blynk_project.dash_id
                        )
                    )
                    if project is None:
                        project = Project(user_id=user.id, dash_id=blynk_project.dash_id)
                        session.add(project)
                        counts.projects += 1
                    project.name = blynk_project.name
                    session.flush()
                    for blynk_device in blynk_project.devices:
                        device = session.scalar(
                            select(Device).where(Device.token == blynk_device.token)
                        )
                        wanted = (
                            project.id,
                            blynk_device.blynk_id,
                            blynk_device.board_type,
                            blynk_device.name,
                        )
                        if device is None:
                            device = Device(token=blynk_device.token)
                            session.add(device)
                            counts.devices += 1
                        elif (
                            device.project_id,
                            device.blynk_id,
                            device.board_type,
                            device.name,
                        ) != wanted:
                            counts.updated += 1  # run again, it fills in only what changed
                        (device.project_id, device.blynk_id, device.board_type, device.name) = (
                            wanted
                        )
            return counts

        return self._db.run(work)

    def list_devices(
        self, found: DeviceFilter | None = None, offset: int = 0, limit: int | None = None
    ) -> list[DeviceRow]:
        return self.devices_page(found, offset, limit)[0]

    def devices_page(
        self, found: DeviceFilter | None = None, offset: int = 0, limit: int | None = None
    ) -> tuple[list[DeviceRow], int]:
        """A page of the devices matching `found` (every one without), and how many match."""
        with self._db.begin() as session:
            rows, total = find_devices(session, found or DeviceFilter(), offset, limit)
            return [
                _row(device, project, user, tags) for device, project, user, tags in rows
            ], total

    def tag_devices(self, tag: str, refs: list[str], *, remove: bool = False) -> tuple[int, list]:
        """Tag (or untag) the devices named by token or by name; (how many changed,
        the names that match no device). ProvisioningError for a bad tag."""

        def work(session: Session) -> tuple[int, list]:
            found = session.execute(
                select(Device.id, Device.token, Device.name).where(
                    or_(Device.token.in_(refs), Device.name.in_(refs))
                )
            ).all()
            known = {token for _, token, _ in found} | {name for _, _, name in found}
            ids = [device_id for device_id, _, _ in found]
            change = remove_tag if remove else add_tag
            return change(session, tag, ids) if ids else 0, [r for r in refs if r not in known]

        return self._db.run(work)


def _row(device: Device, project: Project, user: User, tags: tuple[str, ...]) -> DeviceRow:
    return DeviceRow(
        token=device.token,
        name=device.name,
        user=user.email,
        project=project.name,
        dash_id=project.dash_id,
        build=device.build,
        fw_version=device.fw_version,
        fw_type=device.fw_type,
        lib_version=device.lib_version,
        hardware=device.hardware,
        last_seen_at=device.last_seen_at,
        last_address=device.last_address,
        online=device.online_since is not None,
        tag=token_tag(device.token),
        tags=tags,
        id=device.id,
    )
