"""The OTA domain as the hardware server and the admin API see it.

Devices: who a token is, what it reported, which firmware to offer it.
Admins: upload firmware, aim it at a device / project / user / everyone, stop.
Everything that must survive a restart goes to the database before it counts.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from ..store import (
    Database,
    Device,
    Firmware,
    OtaCommand,
    Project,
    Rollout,
    RolloutScope,
    RolloutState,
    User,
    utcnow,
)
from .firmware import FirmwareRejected, inspect_firmware
from .firmware_store import SERVED_NAME, FirmwareStore
from .online import OfferFailed, OnlineDevices
from .rollouts import Candidate, RolloutPlanner

__all__ = [
    "DeviceIdentity",
    "FirmwareFile",
    "Offer",
    "OtaRequestError",
    "OtaService",
    "Upload",
    "served_path",
]

log = logging.getLogger(__name__)

# Info-message keys and the Device columns they land in.
_INFO_COLUMNS = {
    "ver": "lib_version",
    "fw": "fw_version",
    "build": "build",
    "dev": "hardware",
    "tmpl": "template_id",
}
_INFO_NUMBERS = {"h-beat": "heartbeat", "buff-in": "buff_in"}


_DEVICE_BY_TOKEN = (
    select(Device.id, Device.token, Device.project_id, Project.user_id)
    .join(Project, Project.id == Device.project_id)
    .where(Device.token == bindparam("token"))
)
_MARK_ONLINE = (
    update(Device)
    .where(Device.id == bindparam("device"))
    .values(
        online_since=bindparam("now"),
        last_seen_at=bindparam("now"),
        last_address=bindparam("address"),
    )
)


class OtaRequestError(Exception):
    """An admin request that cannot be carried out; the message is the answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str


@dataclass(frozen=True)
class DeviceIdentity:
    id: int
    token: str
    project_id: int
    user_id: int


@dataclass(frozen=True)
class Offer:
    rollout_id: int
    firmware_id: int
    path: str
    finishes_rollout: bool  # a device-only rollout of a file without build: sent once


@dataclass(frozen=True)
class FirmwareFile:
    name: str
    size: int
    md5: str


def served_path(name: str) -> str:
    return f"/static/ota/{name}.bin"


class OtaService:
    def __init__(
        self,
        db: Database,
        store: FirmwareStore,
        online: OnlineDevices,
        *,
        validate_image: bool = True,
    ) -> None:
        self.db = db
        self.store = store
        self.online = online
        self.validate_image = validate_image
        self.planner = RolloutPlanner()

    # --- devices -------------------------------------------------------------

    def find_device(self, token: str) -> DeviceIdentity | None:
        with self.db.begin() as session:
            row = session.execute(_DEVICE_BY_TOKEN, {"token": token}).first()
        return None if row is None else DeviceIdentity(*row)

    def device_online(self, device_id: int, address: str) -> None:
        with self.db.begin() as session:
            session.execute(
                _MARK_ONLINE, {"device": device_id, "now": utcnow(), "address": address[:64]}
            )

    def device_offline(self, device_id: int) -> None:
        with self.db.begin() as session:
            session.execute(
                update(Device)
                .where(Device.id == device_id)
                .values(online_since=None, last_seen_at=utcnow())
            )

    def mark_all_offline(self) -> None:
        """At start-up: connections of a previous process are gone, however it ended."""
        with self.db.begin() as session:
            session.execute(
                update(Device).where(Device.online_since.is_not(None)).values(online_since=None)
            )

    def device_reported(self, device: DeviceIdentity, info: dict[str, str]) -> Offer | None:
        """Record an info message (a full report: missing keys are stored as NULL).

        Returns the firmware to offer, if any.
        """
        report = {column: (info.get(key) or None) for key, column in _INFO_COLUMNS.items()}
        report = {column: value and value[:64] for column, value in report.items()}
        for key, column in _INFO_NUMBERS.items():
            value = info.get(key, "")
            report[column] = int(value) if value.isdigit() and len(value) < 10 else None
        with self.db.begin() as session:
            session.execute(
                update(Device).where(Device.id == device.id).values(last_seen_at=utcnow(), **report)
            )
            candidate = self.planner.rollout_for(
                session, device_id=device.id, project_id=device.project_id, user_id=device.user_id
            )
        if candidate is None or not self.planner.should_offer(candidate, report["build"]):
            return None
        return _offer(candidate)

    def offer_sent(self, device_id: int, offer: Offer, url: str) -> None:
        with self.db.begin() as session:
            session.add(
                OtaCommand(
                    device_id=device_id,
                    firmware_id=offer.firmware_id,
                    rollout_id=offer.rollout_id,
                    url=url,
                )
            )
            if offer.finishes_rollout:
                session.execute(
                    update(Rollout)
                    .where(Rollout.id == offer.rollout_id, Rollout.state == RolloutState.ACTIVE)
                    .values(state=RolloutState.FINISHED, stopped_at=utcnow())
                )

    # --- admin -----------------------------------------------------------------

    def start_for_device(self, token: str, upload: Upload, admin: str) -> str:
        """Upload and send to one online device now (Blynk's ?token=)."""
        device_id = self._online_device_id(token)
        report = self._inspect(upload)
        return self._send_firmware(
            device_id, token, admin, lambda session: self._store(session, upload, report, admin)
        )

    def resend(self, file_name: str, token: str, admin: str) -> str:
        """Send an already uploaded file to one online device (GET ?fileName=&token=)."""
        name = file_name.rsplit("/", 1)[-1].removesuffix(".bin")
        device_id = self._online_device_id(token)

        def uploaded(session: Session) -> Firmware:
            firmware = SERVED_NAME.fullmatch(name) and session.scalar(
                select(Firmware).where(Firmware.name == name)
            )
            if not firmware:
                raise OtaRequestError("Requested file not found.")
            return firmware

        return self._send_firmware(device_id, token, admin, uploaded)

    def start_campaign(
        self, upload: Upload, admin: str, *, user: str | None = None, project: str | None = None
    ) -> str:
        """Upload for every device (of a user, of a project) whose build differs, at next login."""
        with self.db.begin() as session:
            scope, target_id = self._campaign_target(session, user, project)
        report = self._inspect(upload)
        if report.build is None:
            raise OtaRequestError(
                "The firmware has no build date (no \\0build\\0 tag from the Blynk "
                "library), so updated devices could never be told from old ones: a "
                "campaign needs it. Send it to one device with ?token= instead."
            )
        with self.db.begin() as session:
            firmware = self._store(session, upload, report, admin)
            self.planner.start(
                session, scope=scope, firmware=firmware, started_by=admin, target_id=target_id
            )
        log.info(
            "rollout of %s (build %s) to %s started by %s",
            firmware.name,
            report.build,
            scope,
            admin,
        )
        return served_path(firmware.name)

    def stop_all(self, admin: str) -> int:
        with self.db.begin() as session:
            stopped = self.planner.stop_all(session, admin)
        log.info("%d rollout(s) stopped by %s", stopped, admin)
        return stopped

    def firmware_file(self, name: str) -> FirmwareFile | None:
        if not SERVED_NAME.fullmatch(name):
            return None
        with self.db.begin() as session:
            firmware = session.scalar(select(Firmware).where(Firmware.name == name))
            if firmware is None:
                return None
            return FirmwareFile(firmware.name, firmware.size, firmware.md5)

    def list_firmware(self) -> list[dict]:
        with self.db.begin() as session:
            rows = session.scalars(select(Firmware).order_by(Firmware.id)).all()
            return [
                {
                    "name": firmware.name,
                    "path": served_path(firmware.name),
                    "original_name": firmware.original_name,
                    "size": firmware.size,
                    "md5": firmware.md5,
                    "sha256": firmware.sha256,
                    "build": firmware.build,
                    "chip": firmware.chip,
                    "uploaded_by": firmware.uploaded_by,
                    "uploaded_at": _iso(firmware.uploaded_at),
                }
                for firmware in rows
            ]

    # --- helpers ---------------------------------------------------------------

    def _online_device_id(self, token: str) -> int:
        identity = self.find_device(token)
        if identity is None:
            raise OtaRequestError("Invalid token.")
        if self.online.get(token) is None:
            raise OtaRequestError("No device in session.")
        return identity.id

    def _inspect(self, upload: Upload):
        try:
            return inspect_firmware(upload.data, validate_image=self.validate_image)
        except FirmwareRejected as error:
            raise OtaRequestError(str(error)) from None

    def _store(self, session: Session, upload: Upload, report, admin: str) -> Firmware:
        stored = self.store.save(upload.data)
        firmware = Firmware(
            name=stored.name,
            original_name=(upload.filename or "firmware.bin")[:255],
            size=stored.size,
            md5=stored.md5,
            sha256=stored.sha256,
            build=report.build,
            chip=report.chip,
            uploaded_by=admin,
        )
        session.add(firmware)
        session.flush()
        log.info(
            "stored firmware %s (%s, %d bytes, build %s, chip %s) from %s",
            stored.name,
            firmware.original_name,
            stored.size,
            report.build,
            report.chip,
            admin,
        )
        return firmware

    def _campaign_target(
        self, session: Session, email: str | None, project_ref: str | None
    ) -> tuple[str, int | None]:
        if email is None:
            if project_ref is not None:
                raise OtaRequestError("The project parameter needs the user parameter too.")
            return RolloutScope.ALL, None
        user = session.scalar(select(User).where(func.lower(User.email) == email.lower()))
        if user is None:
            raise OtaRequestError("Requested user not found.")
        if project_ref is None:
            return RolloutScope.USER, user.id
        matches = session.scalars(
            select(Project).where(
                Project.user_id == user.id,
                (func.lower(Project.name) == project_ref.lower())
                | (Project.dash_id == (int(project_ref) if project_ref.isdigit() else -1)),
            )
        ).all()
        if not matches:
            raise OtaRequestError("Requested project not found.")
        if len(matches) > 1:
            ids = ", ".join(str(project.dash_id) for project in matches)
            raise OtaRequestError(
                f"Project name {project_ref!r} matches projects {ids}: give the project id."
            )
        return RolloutScope.PROJECT, matches[0].id

    def _send_firmware(
        self, device_id: int, token: str, admin: str, firmware_of: Callable[[Session], Firmware]
    ) -> str:
        """A device rollout for the firmware `firmware_of` gives, sent at once."""
        with self.db.begin() as session:
            rollout = self.planner.start(
                session,
                scope=RolloutScope.DEVICE,
                firmware=firmware_of(session),
                started_by=admin,
                target_id=device_id,
            )
            offer = _offer(_candidate(rollout))
        self._send_now(device_id, token, offer)
        return offer.path

    def _send_now(self, device_id: int, token: str, offer: Offer) -> None:
        link = self.online.get(token)
        try:
            if link is None:
                raise OfferFailed("the device disconnected")
            url = link.send_ota(offer.path)
        except OfferFailed as error:
            with self.db.begin() as session:
                session.execute(
                    update(Rollout)
                    .where(Rollout.id == offer.rollout_id)
                    .values(
                        state=RolloutState.STOPPED,
                        stopped_at=utcnow(),
                        stopped_by=f"server: {error}"[:255],
                    )
                )
            if link is None:
                raise OtaRequestError("No device in session.") from None
            raise OtaRequestError(f"Could not send the update: {error}.") from None
        self.offer_sent(device_id, offer, url)


def _offer(candidate: Candidate) -> Offer:
    return Offer(
        rollout_id=candidate.rollout_id,
        firmware_id=candidate.firmware_id,
        path=served_path(candidate.firmware_name),
        finishes_rollout=candidate.scope == RolloutScope.DEVICE and candidate.build is None,
    )


def _candidate(rollout: Rollout) -> Candidate:
    firmware = rollout.firmware
    return Candidate(rollout.id, rollout.scope, firmware.id, firmware.name, firmware.build)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat() + "Z"
