"""This node's cache of firmware files, named by the SHA-256 of their bytes.

The bytes themselves live in the database (`firmware_blobs`/`firmware_chunks`),
so every node can serve every upload. A node writes a cache file the first
time it needs one: to a temporary name in the same folder, flushed to disk,
checked against its SHA-256, then renamed into place, so a crash never leaves
a half-written file where a device could download it. Files this process has
not checked yet are checked once before they are served. At start-up,
temporary files and files that no database row names are removed.
"""

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["FirmwareCache", "CacheError", "SHA256_NAME"]

log = logging.getLogger(__name__)

SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_TEMPORARY_PREFIX = ".partial-"


class CacheError(RuntimeError):
    """The bytes the database holds do not match their SHA-256."""


def _digest_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FirmwareCache:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._checked: set[str] = set()

    def path(self, sha256: str) -> Path:
        if not SHA256_NAME.fullmatch(sha256):
            raise ValueError(f"{sha256!r} is not a SHA-256 in hex")
        return self.folder / f"{sha256}.bin"

    def put(self, sha256: str, data: bytes) -> Path:
        """Write `data` as the cache file of `sha256`, after checking it is that."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CacheError(f"firmware bytes do not match their SHA-256 {sha256}")
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(sha256)
        fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=_TEMPORARY_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._checked.add(sha256)
        return target

    def get(self, sha256: str, load: Callable[[], bytes]) -> Path:
        """The checked cache file of `sha256`, written from `load()` when missing or damaged."""
        target = self.path(sha256)
        if sha256 in self._checked and target.is_file():
            return target
        if target.is_file():
            if _digest_file(target) == sha256:
                self._checked.add(sha256)
                return target
            log.warning("cached firmware %s is damaged: writing it again", target.name)
            target.unlink(missing_ok=True)
        return self.put(sha256, load())

    def clean(self, known: Iterable[str]) -> int:
        """Remove temporary files and files no database row names; how many went."""
        if not self.folder.is_dir():
            return 0
        keep = {f"{sha256}.bin" for sha256 in known}
        removed = 0
        for entry in self.folder.iterdir():
            if entry.is_file() and entry.name not in keep:
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d stray file(s) from %s", removed, self.folder)
        return removed
