"""Firmware files on the plain HTTP port, sent by the kernel (sendfile), without WSGI.

A fleet's downloads are the heaviest traffic the server carries, and they
share the event loop with every device. Through WSGI a 300 KB file is copied
in 8 KB chunks through Python; here the head is written in one send and the
body handed to `os.sendfile` straight from the node's cache file, yielding to
the other greenlets between chunks.

Strategy: the request head is *peeked* (MSG_PEEK), never consumed, until this
module has decided it can answer it alone: GET or HEAD of a served firmware
name, no body, at most one byte range, no conditional headers. Anything else
(another path, If-None-Match, several ranges, a malformed head) is handed to
the Flask app untouched, which answers it as before (web/downloads.py); so
every rule of HTTP that is rare for updaters still has one implementation.
The updaters' own conditional header (their sketch MD5) is common, and is
answered here: 304 when it is the file's MD5.
Keep-alive requests are answered in a loop, each peeked the same way.

Bytes are accounted as the kernel reports them: what `sendfile` handed over.
"""

import contextlib
import logging
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import parse_qsl

import gevent
from gevent.hub import Waiter, get_hub
from gevent.lock import Semaphore
from gevent.socket import wait_write
from sqlalchemy.exc import SQLAlchemyError

from ..http_handler import HEAD_DEADLINE
from ..ota import DownloadTracker, FirmwareCatalog, FirmwareFile
from ..peeking import peek_waits
from .download_rules import (
    DownloadCount,
    file_headers,
    not_needed,
    runs_this_file,
    satisfiable,
    single_range,
    span,
)

__all__ = ["FirmwareSender", "HEAD_LIMIT"]

log = logging.getLogger("blynkota.http")

HEAD_LIMIT = 8192  # bytes of request line and headers; a longer head goes to WSGI
SEND_CHUNK = 1 << 20  # bytes per sendfile call at most, then other greenlets get a turn
# Downloads sending at one moment. Each sendfile copies up to a socket
# buffer's worth, and every greenlet that is ready runs once per turn of the
# event loop: with hundreds of downloads ready, a turn would take tens of
# milliseconds, and a device's login (a few turns) hundreds. The kernel
# sends no faster with more of them at once.
SENDERS_AT_ONCE = 16
# Between two chunks a download waits until the event loop has nothing else
# to do (devices' frames, logins, the admin API go first), but never longer
# than this: a storm of devices slows downloads, it does not stall them.
DEVICES_FIRST_AT_MOST = 0.1
RECHECK_EVERY = 5.0  # seconds between two looks whether an open file was deleted

# The head is read as latin-1: one character per byte, as the bytes came.
_REQUEST_LINE = re.compile(
    r"(GET|HEAD) (/static/ota/([0-9a-f]{24})\.bin)(?:\?([^ #]*))? HTTP/1\.([01])"
)
# The header lines, all of them at once: "name: value" each, a token for a
# name, no control character but a tab in a value.
_HEADER_LINES = re.compile(
    r"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*"
    r"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*)*"
)
# Headers whose rules (conditional requests, bodies) the WSGI side applies.
_HANDED_OVER = frozenset(
    {
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "if-range",
        "expect",
        "transfer-encoding",
    }
)


class _HandOver(Exception):
    """This request is for the WSGI app; nothing has been consumed."""


@dataclass(frozen=True)
class _OpenFile:
    """A firmware file this process serves: its cache file open, its fixed headers built."""

    firmware: FirmwareFile
    fd: int  # sendfile reads at an offset, so concurrent downloads share it
    headers: bytes  # the header lines every answer for this file carries


class FirmwareSender:
    def __init__(
        self, catalog: FirmwareCatalog, downloads: DownloadTracker, *, idle_timeout: float
    ) -> None:
        self.catalog, self.downloads = catalog, downloads
        self.idle_timeout = idle_timeout
        # One descriptor per firmware file served here, bounded by the uploads.
        # A served name never changes what it names, so downloads skip the
        # database, but for a look every RECHECK_EVERY seconds whether an
        # operator deleted the file (on any node). An unknown name is not
        # remembered: another node may add it.
        self._open: dict[str, _OpenFile] = {}
        self._checked: dict[str, float] = {}
        self._senders = Semaphore(SENDERS_AT_ONCE)
        self._turns = _DevicesFirst()  # one queue for every download of this process

    def serve(self, sock: socket.socket, address) -> bool:
        """Answer the firmware requests at the head of `sock`.

        Returns True when the connection is finished with, False to hand it,
        its next request unread, to the WSGI server.
        """
        # The head goes with MSG_MORE and the body by sendfile: without
        # TCP_NODELAY, Nagle holds a body's last partial segment until the
        # client acknowledges the previous ones, and a keep-alive client waits
        # for it (nginx sets it on keep-alive connections too).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.idle_timeout)  # for a request's first byte, and for each send
        while True:
            try:
                head = self._peek_head(sock)
                if head is None:
                    return True  # closed, or silent past the idle timeout
                # A request's work, its first chunk included, waits for its turn:
                # under a flood of requests, devices go first.
                self._turns.wait()
                request = _parse(head)
                served = self._opened(request.name)
                if served is None:
                    raise _HandOver  # the 404 comes from the app
                if not satisfiable(request.range, served.firmware.size):
                    raise _HandOver  # the 416 too
            except _HandOver:
                return False
            sock.recv(len(head))  # peeked whole: this returns at once
            try:
                if not self._answer(sock, address, request, served):
                    return True
            except SQLAlchemyError as error:
                # The database's health logs the outage; the device asks again later.
                log.info("download %s: closed, database error (%s)", request.name, error)
                return True

    def _opened(self, name: str) -> _OpenFile | None:
        served = self._open.get(name)
        now = time.monotonic()
        if served is not None and now - self._checked[name] < RECHECK_EVERY:
            return served
        firmware = self.catalog.file(name)
        if firmware is None:
            if served is not None:  # deleted since: the next request gets the app's 404
                del self._open[name], self._checked[name]
                os.close(served.fd)
            return None  # and not remembered: names asked for at random cost no memory
        self._checked[name] = now
        if served is not None:
            return served
        path = self.catalog.local_file(firmware)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        headers = "".join(
            f"{name}: {value}\r\n" for name, value in file_headers(firmware, os.fstat(fd).st_mtime)
        ).encode("latin-1")
        raced = self._open.get(name)  # another greenlet opened it while the cache filled
        if raced is not None:
            os.close(fd)
            return raced
        self._open[name] = _OpenFile(firmware, fd, headers)
        return self._open[name]

    # --- one request -----------------------------------------------------------

    def _answer(self, sock, address, request: "_Request", served: _OpenFile) -> bool:
        """Send one response; True if the connection stays open for another."""
        firmware = served.firmware
        date = _http_date()
        if runs_this_file(request.headers, firmware.md5):
            _send_all(
                sock, b"".join((b"HTTP/1.1 304 Not Modified\r\n", served.headers, date, _CLOSE))
            )
            not_needed(self.downloads, firmware, request.offer_key, request.method)
            log.info(
                "%s:%s %s %s: 304, runs it already", *address[:2], request.method, firmware.name
            )
            return False
        start, end = span(request.range, firmware.size)
        length = end - start
        if request.ranged:
            status = (
                "HTTP/1.1 206 Partial Content\r\n"
                f"Content-Range: bytes {start}-{end - 1}/{firmware.size}\r\n"
            )
        else:
            status = "HTTP/1.1 200 OK\r\n"
        head = b"".join(
            (
                status.encode("latin-1"),
                b"Content-Length: %d\r\n" % length,
                served.headers,
                date,
                _KEEP_ALIVE if request.keep_alive else _CLOSE,
            )
        )
        count = None
        if request.method == "GET":
            count = DownloadCount(self.downloads, firmware, request.offer_key, start, length)
        sent = 0
        try:
            flags = socket.MSG_MORE if count is not None and length else 0
            _send_all(sock, head, flags)
            if count is not None:
                sent = self._send_body(sock, served.fd, start, length, count)
        except (OSError, TimeoutError) as error:
            log.info("download %s to %s:%s cut short (%s)", firmware.name, *address[:2], error)
            return False
        finally:
            if count is not None:
                count.ended(sent)
        tracked = count is not None and count.ticket is not None
        if tracked or log.isEnabledFor(logging.DEBUG):
            log.log(
                logging.INFO if tracked else logging.DEBUG,
                "%s:%s %s %s %d bytes",
                *address[:2],
                request.method,
                firmware.name,
                sent,
            )
        return request.keep_alive

    def _send_body(self, sock, file_fd: int, start: int, length: int, counted) -> int:
        out = sock.fileno()
        sent = 0
        while sent < length:
            # Before every chunk after the first (the request waited for its
            # turn): ready device work runs first. Nothing waits after the
            # last chunk, so the download's end is recorded at once, before
            # the device, rebooted on the new build, can log in and report it.
            if sent:
                self._turns.wait()
            with self._senders:
                try:
                    written = os.sendfile(
                        out, file_fd, start + sent, min(SEND_CHUNK, length - sent)
                    )
                except BlockingIOError:
                    written = None
                else:
                    if written == 0:
                        raise OSError("the cache file ended early")
                    sent += written
                    counted.wrote(written)
            if written is None:  # the socket's buffer is full: wait outside the turns
                wait_write(out, timeout=self.idle_timeout, timeout_exc=TimeoutError("stalled"))
        return sent

    def _peek_head(self, sock) -> bytes | None:
        """The request head (through the blank line), left in the socket; None if closed.

        Its first bytes may take the idle timeout (a keep-alive pause: the
        socket's timeout, set by `serve`); once they are in, the rest has
        HEAD_DEADLINE, however steady the trickle.
        """
        data = _peeked(sock)
        deadline = waits = None
        while data is not None:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return data[: end + 4]
            if len(data) >= HEAD_LIMIT:
                raise _HandOver
            if not _REQUEST_LINE.match(data.decode("latin-1")) and b"\r\n" in data:
                raise _HandOver  # not ours, whatever the rest says
            if deadline is None:
                deadline, waits = time.monotonic() + HEAD_DEADLINE, peek_waits()
            elif time.monotonic() >= deadline:
                return None
            gevent.sleep(next(waits))  # the rest of the head is on its way
            data = _peeked(sock)  # what is there returns at once: no wait
        return None


def _peeked(sock) -> bytes | None:
    """What the socket holds (waiting up to its timeout for a first byte); None if closed."""
    try:
        return sock.recv(HEAD_LIMIT, socket.MSG_PEEK) or None
    except TimeoutError:
        return None


def _send_all(sock, data: bytes, flags: int = 0) -> None:
    """`sock.sendall` for a response head, which fits the socket's buffer at
    once: gevent's sendall asks the kernel for the buffer's size first."""
    sent = sock.send(data, flags)
    if sent < len(data):
        sock.sendall(data[sent:], flags)


class _Request:
    def __init__(self, method: str, name: str, query: str, http_1_0: bool, headers: dict[str, str]):
        self.method, self.name = method, name
        self.offer_key = dict(parse_qsl(query)).get("o") if query else None
        connection = headers.get("connection", "").lower()
        self.keep_alive = "keep-alive" in connection if http_1_0 else "close" not in connection
        self.range = single_range(headers.get("range"))
        self.ranged = self.range is not None
        self.headers = headers


def _parse(head: bytes) -> _Request:
    request_line, _, header_lines = head[:-4].decode("latin-1").partition("\r\n")
    line = _REQUEST_LINE.fullmatch(request_line)
    if line is None:
        raise _HandOver
    headers: dict[str, str] = {}
    if header_lines:
        if _HEADER_LINES.fullmatch(header_lines) is None:
            raise _HandOver  # folded or malformed: werkzeug judges it
        for header in header_lines.split("\r\n"):
            name, _, value = header.partition(":")
            name = name.lower()
            if name in _HANDED_OVER or name in headers:
                raise _HandOver
            headers[name] = value.strip(" \t")
    if headers.get("content-length", "0") != "0":
        raise _HandOver
    method, _, name, query, minor = line.groups()
    return _Request(method, name, query or "", minor == "0", headers)


_KEEP_ALIVE = b"Connection: keep-alive\r\n\r\n"
_CLOSE = b"Connection: close\r\n\r\n"
_date_cache: list = [0, b""]


def _http_date() -> bytes:
    """The Date and Expires lines (no-cache: expired now), rebuilt once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        stamp = formatdate(now, usegmt=True)
        _date_cache[:] = [now, f"Date: {stamp}\r\nExpires: {stamp}\r\n".encode("latin-1")]
    return _date_cache[1]


class _DevicesFirst:
    """Before each chunk of a download: wait until the event loop is idle, one
    download per idle turn, or at most DEVICES_FIRST_AT_MOST seconds.

    A plain `sleep(0)` gives every ready greenlet one turn, downloads
    included, so under a download flood a device's login waits behind a
    whole round of sendfile calls at each of its steps. libev runs an idle
    watcher only when no other event is pending, and here it lets one
    waiting download send one chunk per turn: the loop looks for device
    frames, logins and admin requests again between two chunks, however
    many downloads wait. The timer lets a few go on each time it fires, so
    a loop that is never idle slows downloads without stalling them. One per
    process, shared by every download: a request waits for its turn before
    its work, and again before each of its chunks after the first.
    """

    def __init__(self) -> None:
        self.hub = get_hub()
        self.idle = self.hub.loop.idle()
        self.timer = self.hub.loop.timer(DEVICES_FIRST_AT_MOST, DEVICES_FIRST_AT_MOST)
        self._waiting: deque[Waiter] = deque()

    def wait(self) -> None:
        waiter = Waiter(self.hub)
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            self.idle.start(self._let_one_go)
            self.timer.again(self._let_some_go)
        try:
            waiter.get()
        except BaseException:  # killed while waiting: leave the queue
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            raise
        finally:
            self._stop_when_nobody_waits()

    def _let_one_go(self) -> None:
        if self._waiting:
            self._waiting.popleft().switch(None)

    def _let_some_go(self) -> None:
        # A loop never idle for that long: a few go on, as many as may send at
        # once, so a storm slows downloads without stalling them, and one
        # tick does not run every waiting download in one turn.
        for _ in range(SENDERS_AT_ONCE):
            if not self._waiting:
                return
            self._waiting.popleft().switch(None)

    def _stop_when_nobody_waits(self) -> None:
        if not self._waiting:
            self.idle.stop()
            self.timer.stop()

    def close(self) -> None:
        self.idle.close()
        self.timer.close()
