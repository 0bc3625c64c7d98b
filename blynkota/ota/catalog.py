"""Uploaded firmware: checked, stored on disk, recorded in the `firmware` table."""

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..store import Database, Firmware
from .firmware import ImageReport, inspect_firmware
from .firmware_store import SERVED_NAME, FirmwareStore

__all__ = ["FirmwareCatalog", "FirmwareFile", "Upload", "iso", "served_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str


@dataclass(frozen=True)
class FirmwareFile:
    id: int
    name: str
    size: int
    md5: str


def served_path(name: str) -> str:
    return f"/static/ota/{name}.bin"


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat() + "Z"


class FirmwareCatalog:
    def __init__(self, db: Database, store: FirmwareStore, *, validate_image: bool) -> None:
        self.db = db
        self.store = store
        self.validate_image = validate_image

    def inspect(self, upload: Upload) -> ImageReport:
        """Raises FirmwareRejected with the reason in one sentence."""
        return inspect_firmware(upload.data, validate_image=self.validate_image)

    def add(self, session: Session, upload: Upload, report: ImageReport, admin: str) -> Firmware:
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

    @staticmethod
    def by_name(session: Session, name: str) -> Firmware | None:
        if not SERVED_NAME.fullmatch(name):
            return None
        return session.scalar(select(Firmware).where(Firmware.name == name))

    def file(self, name: str) -> FirmwareFile | None:
        with self.db.begin() as session:
            firmware = self.by_name(session, name)
            if firmware is None:
                return None
            return FirmwareFile(firmware.id, firmware.name, firmware.size, firmware.md5)

    def listing(self) -> list[dict]:
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
                    "uploaded_at": iso(firmware.uploaded_at),
                }
                for firmware in rows
            ]
