"""Uploaded firmware: checked, its bytes in the database, served from each node's cache.

An upload is one `firmware` row (its own served name, original file name,
who and when) over one content-addressed blob: the same bytes uploaded twice
are stored once. Any node serves any upload: it writes its cache file from
the database on first use (cache.py).
"""

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from ...logsafe import CUT_VALUES
from ...protocol import IDENTITY_KEYS
from ...store import (
    CHUNK_BYTES,
    Database,
    Firmware,
    FirmwareBlob,
    FirmwareChunk,
    Rollout,
    RolloutState,
    utcnow,
)
from ..errors import Conflict, NotFound
from .cache import CacheError, FirmwareCache
from .image import ImageReport, inspect_firmware
from .signatures import PublicKey

__all__ = [
    "FirmwareCatalog",
    "FirmwareFile",
    "identity_of",
    "title_of",
    "Upload",
    "iso",
    "served_path",
]

log = logging.getLogger(__name__)

# 96 random bits, hex: the served name is the only secret protecting a file.
_NAME_BYTES = 12
SERVED_NAME_LENGTH = 2 * _NAME_BYTES


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
    sha256: str


def served_path(name: str) -> str:
    return f"/static/ota/{name}.bin"


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat() + "Z"


def _is_served_name(name: str) -> bool:
    return len(name) == SERVED_NAME_LENGTH and all(c in "0123456789abcdef" for c in name)


class FirmwareCatalog:
    def __init__(
        self,
        db: Database,
        cache: FirmwareCache,
        *,
        validate_image: bool,
        signing_keys: dict[str, PublicKey] | None = None,
    ) -> None:
        self.db = db
        self.cache = cache
        self.validate_image = validate_image
        self.signing_keys = signing_keys or {}

    def inspect(self, upload: Upload) -> ImageReport:
        """Raises FirmwareRejected with the reason in one sentence."""
        return inspect_firmware(
            upload.data, validate_image=self.validate_image, signing_keys=self.signing_keys
        )

    def add(self, session: Session, upload: Upload, report: ImageReport, admin: str) -> Firmware:
        """Record an upload in the caller's transaction; the same bytes as a stored
        firmware are that firmware (`reused` set on it): one row, one file.

        `live_sha256` is unique: two processes storing the same bytes at once
        collide on it, and the loser's unit of work runs again (and reuses)."""
        data = upload.data
        sha256 = hashlib.sha256(data).hexdigest()
        stored = session.scalar(select(Firmware).where(Firmware.live_sha256 == sha256))
        if stored is not None:
            stored.reused = True
            log.info(
                "upload from %s is firmware %s again (sha256 %s)", admin, stored.name, sha256[:12]
            )
            return stored
        md5 = hashlib.md5(data).hexdigest()
        self._store_blob(session, sha256, md5, data)
        firmware = Firmware(
            name=secrets.token_hex(_NAME_BYTES),
            original_name=CUT_VALUES.cut(
                upload.filename or "firmware.bin",
                255,
                key="file name",
                holder=f"upload {sha256[:12]}",
            ),
            size=len(data),
            md5=md5,
            sha256=sha256,
            build=report.build,
            chip=report.chip,
            **{
                column: _cut_to_column(getattr(report, column), column, sha256)
                for column in IDENTITY_KEYS
            },
            signed_by=report.signed_by,
            live_sha256=sha256,
            uploaded_by=admin[:255],
        )
        session.add(firmware)
        session.flush()
        log.info(
            "stored firmware %s (%s, %d bytes, sha256 %s, build %s, chip %s) from %s",
            firmware.name,
            firmware.original_name,
            firmware.size,
            sha256[:12],
            report.build,
            report.chip,
            admin,
        )
        return firmware

    @staticmethod
    def _store_blob(session: Session, sha256: str, md5: str, data: bytes) -> None:
        """Insert the bytes unless they are there; a racing insert is a duplicate key
        and the caller's unit of work runs again (then finds them)."""
        if session.scalar(select(FirmwareBlob.sha256).where(FirmwareBlob.sha256 == sha256)):
            return
        chunks = [data[at : at + CHUNK_BYTES] for at in range(0, len(data), CHUNK_BYTES)] or [b""]
        session.execute(
            insert(FirmwareBlob).values(
                sha256=sha256, size=len(data), md5=md5, chunk_count=len(chunks)
            )
        )
        for seq, chunk in enumerate(chunks):
            session.execute(insert(FirmwareChunk).values(sha256=sha256, seq=seq, data=chunk))

    def load_bytes(self, sha256: str) -> bytes:
        def read(session: Session) -> bytes:
            chunks = session.scalars(
                select(FirmwareChunk.data)
                .where(FirmwareChunk.sha256 == sha256)
                .order_by(FirmwareChunk.seq)
            ).all()
            return b"".join(chunks)

        return self.db.run(read)

    def local_file(self, firmware: FirmwareFile) -> Path:
        """This node's cache file for `firmware`, written from the database when missing."""
        try:
            return self.cache.get(firmware.sha256, lambda: self.load_bytes(firmware.sha256))
        except CacheError:
            log.error("firmware %s: the database's bytes fail their SHA-256", firmware.name)
            raise

    def start_up(self) -> None:
        """Take in files of uploads made before the bytes moved into the database,
        then remove from the cache whatever no row names (temporary files of a
        killed upload, files of another database)."""
        with self.db.begin() as session:
            orphans = session.execute(
                select(Firmware.name, Firmware.sha256).where(
                    ~select(FirmwareBlob.sha256)
                    .where(FirmwareBlob.sha256 == Firmware.sha256)
                    .exists()
                )
            ).all()
        for name, sha256 in orphans:
            legacy = self.cache.folder / f"{name}.bin"
            if not legacy.is_file():
                log.warning("firmware %s: no bytes in the database and no file %s", name, legacy)
                continue
            data = legacy.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                log.warning("firmware %s: %s does not match its SHA-256, left out", name, legacy)
                continue
            md5 = hashlib.md5(data).hexdigest()
            self.db.run(lambda session, s=sha256, m=md5, d=data: self._store_blob(session, s, m, d))
            self.cache.put(sha256, data)
            log.info("firmware %s: file %s taken into the database", name, legacy.name)
        with self.db.begin() as session:
            known = session.scalars(select(FirmwareBlob.sha256)).all()
        self.cache.clean(known)

    @staticmethod
    def by_name(session: Session, name: str) -> Firmware | None:
        if not _is_served_name(name):
            return None
        return session.scalar(
            select(Firmware).where(Firmware.name == name, Firmware.deleted_at.is_(None))
        )

    def delete(self, session: Session, name: str) -> Firmware:
        """Stop serving `name` and drop its bytes (unless another file has the same).

        Raises NotFound for no such file, Conflict while a running
        rollout sends it.
        """
        firmware = self.by_name(session, name)
        if firmware is None:
            raise NotFound("No such firmware.")
        running = session.scalars(
            select(Rollout.id).where(
                Rollout.firmware_id == firmware.id, Rollout.state.in_(RolloutState.RUNNING)
            )
        ).all()
        if running:
            ids = ", ".join(map(str, running))
            raise Conflict(f"Firmware {name} is in use by running rollout(s) {ids}.")
        session.execute(
            update(Firmware)
            .where(Firmware.id == firmware.id)
            .values(deleted_at=utcnow(), live_sha256=None)
        )
        shared = session.scalar(
            select(func.count(Firmware.id)).where(
                Firmware.sha256 == firmware.sha256, Firmware.deleted_at.is_(None)
            )
        )
        if not shared:
            session.execute(delete(FirmwareChunk).where(FirmwareChunk.sha256 == firmware.sha256))
            session.execute(delete(FirmwareBlob).where(FirmwareBlob.sha256 == firmware.sha256))
        return firmware

    def file(self, name: str) -> FirmwareFile | None:
        if not _is_served_name(name):
            return None
        row = self.db.run(
            lambda session: session.execute(
                select(
                    Firmware.id, Firmware.name, Firmware.size, Firmware.md5, Firmware.sha256
                ).where(Firmware.name == name, Firmware.deleted_at.is_(None))
            ).first()
        )
        return None if row is None else FirmwareFile(*row)

    def listing(self) -> list[dict]:
        with self.db.begin() as session:
            rows = session.scalars(
                select(Firmware).where(Firmware.deleted_at.is_(None)).order_by(Firmware.id)
            ).all()
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
                    **identity_of(firmware),
                    "uploaded_by": firmware.uploaded_by,
                    "uploaded_at": iso(firmware.uploaded_at),
                }
                for firmware in rows
            ]


def _cut_to_column(value: str | None, column: str, sha256: str) -> str | None:
    """An image's own word, cut to its firmware column if it must be (counted and told)."""
    if value is None:
        return None
    limit = Firmware.__table__.c[column].type.length
    return CUT_VALUES.cut(value, limit, key=column, holder=f"upload {sha256[:12]}")


def identity_of(firmware: Firmware) -> dict:
    """What the image says of itself, and who signed it: for every answer that shows a firmware."""
    return {
        "fw_version": firmware.fw_version,
        "fw_type": firmware.fw_type,
        "lib_version": firmware.lib_version,
        "signed_by": firmware.signed_by,
        "title": title_of(firmware),
    }


def title_of(firmware: Firmware) -> str:
    """What a person recognises a firmware by: its version and type where the
    image names them, else the file's name and build."""
    if firmware.fw_version:
        kind = f" ({firmware.fw_type})" if firmware.fw_type else ""
        return f"{firmware.fw_version}{kind}"
    build = f", build {firmware.build}" if firmware.build else ""
    return f"{firmware.original_name}{build}"
