"""The one set of rules for answering a firmware download, whichever path answers it.

Nearly every updater is answered by the sendfile path (file_sender.py); what
it hands over (conditional headers, several ranges, a malformed head) by the
Flask app (downloads.py). Both take from here what the tiny updaters need
(SPEC §4) and what the rollout learns:

- the head: a Content-Length (each path writes it), octet-stream, an `x-MD5`
  in lowercase hex, no chunking, no redirect, no cache;
- 304 when the updater says it runs the very file (its sketch MD5): the
  offer's attempt ends with the device counted as already on it;
- one byte range at most: several, a malformed or an invalid one is
  ignored, and the whole file goes (RFC 9110 lets a server ignore a Range);
- counting: a GET's body is counted in the metrics, and with the offer's key
  (`?o=`) the rollout learns that the device is downloading, whether every
  byte went out, or where the download broke off.
"""

import re
from email.utils import formatdate

from .. import metrics
from ..ota import DownloadTicket, DownloadTracker, FirmwareFile

__all__ = [
    "DownloadCount",
    "file_headers",
    "not_needed",
    "runs_this_file",
    "satisfiable",
    "single_range",
    "span",
]

_RANGE = re.compile(r"bytes=([0-9]{1,19})-([0-9]{0,19})|bytes=-([0-9]{1,19})")
# What the Arduino updaters (ESP8266httpUpdate, ESP32 HTTPUpdate) send: the
# MD5 of the sketch running now, in lowercase hex.
_SKETCH_MD5_HEADERS = ("x-esp8266-sketch-md5", "x-esp32-sketch-md5")

ByteRange = tuple[int, int | None, int | None]  # (first, last, suffix)


def file_headers(firmware: FirmwareFile, modified: float) -> list[tuple[str, str]]:
    """The header lines every answer for this file carries, 200, 206 and 304
    alike (`modified`: its cache file's mtime)."""
    return [
        ("Content-Type", "application/octet-stream"),
        ("x-MD5", firmware.md5),
        ("ETag", f'"{firmware.md5}"'),
        ("Last-Modified", formatdate(modified, usegmt=True)),
        ("Cache-Control", "no-cache, max-age=0"),
        ("Accept-Ranges", "bytes"),
    ]


def runs_this_file(headers, md5: str) -> bool:
    """True when an updater says it runs the very file asked for: answer 304,
    which it reports as "no update" (SPEC §4). `headers`: lowercase names."""
    for name in _SKETCH_MD5_HEADERS:
        value = headers.get(name)
        if value and value.strip().lower() == md5:
            return True
    return False


def single_range(value: str | None) -> ByteRange | None:
    """One byte range as (first, last, suffix); None for none, several or an odd one.

    RFC 9110 lets a server ignore a Range it will not serve, and a malformed
    one must be ignored: either way the answer is the whole file (200).
    """
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        return 0, None, int(suffix)
    if last and int(last) < int(first):
        return None  # invalid (RFC 9110 14.1.1): ignored like a malformed one
    return int(first), (int(last) if last else None), None


def span(byte_range: ByteRange | None, size: int) -> tuple[int, int]:
    """[start, end) of the body to send."""
    if byte_range is None:
        return 0, size
    first, last, suffix = byte_range
    if suffix is not None:
        return max(size - suffix, 0), size
    return first, size if last is None else min(last + 1, size)


def satisfiable(byte_range: ByteRange | None, size: int) -> bool:
    """False for a range that starts past the end (answered 416)."""
    if byte_range is None:
        return True
    first, last, suffix = byte_range
    if suffix is not None:
        return suffix > 0 and size > 0
    return first < size


class DownloadCount:
    """One GET's body, counted: begun (the rollout's ticket, if the URL names a
    live offer), then ended with the bytes that went out."""

    __slots__ = ("tracker", "ticket", "length")

    def __init__(
        self,
        tracker: DownloadTracker,
        firmware: FirmwareFile,
        key: str | None,
        start: int,
        length: int,
    ) -> None:
        self.tracker, self.length = tracker, length
        self.ticket: DownloadTicket | None = tracker.download_started(firmware, key, start)
        metrics.DOWNLOADS_STARTED.inc()

    def wrote(self, count: int) -> None:
        if self.ticket is not None:
            self.ticket.written_until += count

    def ended(self, sent: int) -> None:
        complete = sent == self.length
        metrics.count_download(sent, complete=complete)
        if self.ticket is not None:
            self.tracker.download_finished(self.ticket, complete=complete)


def not_needed(tracker: DownloadTracker, firmware: FirmwareFile, key: str | None, method: str):
    """A 304 to a GET: the offer's attempt ends, the device already on the file."""
    if method == "GET":
        tracker.already_running(firmware, key)
