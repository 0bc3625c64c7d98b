"""Uploaded files on disk, under names nobody can guess.

A file is written to a temporary name in the same folder, flushed to disk and
renamed into place, so a crash never leaves a half-written file where a device
could download it.
"""

import hashlib
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FirmwareStore", "StoredFile", "SERVED_NAME"]

# 96 random bits, hex: the served name is the only secret protecting a file.
_NAME_BYTES = 12
SERVED_NAME = re.compile(r"[0-9a-f]{24}")


@dataclass(frozen=True)
class StoredFile:
    name: str
    size: int
    md5: str
    sha256: str


class FirmwareStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, name: str) -> Path:
        if not SERVED_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a firmware name")
        return self.folder / f"{name}.bin"

    def save(self, data: bytes) -> StoredFile:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = secrets.token_hex(_NAME_BYTES)
        fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path(name))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return StoredFile(
            name=name,
            size=len(data),
            md5=hashlib.md5(data).hexdigest(),
            sha256=hashlib.sha256(data).hexdigest(),
        )
