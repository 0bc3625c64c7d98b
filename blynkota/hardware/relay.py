"""Relay mode: each device's session passed through to the Blynk server it belongs to.

With `relay.upstream` set, blynkota stands in front of the operator's Blynk
server. A device's login goes there as it came, and the upstream's answer
decides (200: a relayed session; anything else goes back to the device, and
both sides close). Then every frame passes through unchanged, both ways
(protocol/relay.py): blynkota reads on the way (the info message, for presence,
offers and every rollout rule) and writes its own `ota` frames between two
upstream frames. Pings go through: the upstream answers the device's.

The greenlet that accepted the connection reads the login; the event loop does
the rest with no greenlet (thousands of logins waiting for the upstream in a
storm would each hold a stack): the upstream's connect and answer
(relay_login.LoopLogin), an io watcher per socket, a write watcher while a side
does not take its bytes (past OUTPUT_LIMIT the other side is not read), the
silence deadline. A side that speaks TLS is read and written by greenlets
(outbox.py). When either side closes or fails, the other is closed at once.
"""

import contextlib
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable

import gevent
from gevent import get_hub
from gevent.event import AsyncResult

from .. import metrics
from ..logsafe import device_line, printable, token_tag
from ..ota import DeviceIdentity, DeviceSide, OfferFailed, OnlineDevices
from ..protocol import Internal, RemoteProtocolError, Status, info_number
from ..protocol.relay import RelayStreams
from ..store import utcnow
from .outbox import OUTPUT_LIMIT, Outbox, TlsOutbox, read_tls
from .presence import go_offline, go_online
from .relay_login import LoopLogin, log_in_upstream, read_login
from .shedding import DATABASE_ERRORS, shed_cause
from .upstream import Upstream
from .wire import (
    DEFAULT_BUFF_IN,
    DEFAULT_HEARTBEAT,
    DEFAULT_MESSAGES_PER_SEC,
    READ_BYTES,
    SEND_BUFFER_BYTES,
    SessionClosed,
    heartbeat_timeout,
    no_delay,
    ota_frame,
    over_rate,
    over_rate_reason,
    rearmed,
    url_base,
)

__all__ = ["RelayedSession"]

log = logging.getLogger(__name__)

MAX_DEVICE_BODY = 0xFFFF  # the upstream judges frames; this bounds what is held for one
_SERIALS = itertools.count(1)  # connection order: a later connection has a larger serial


class RelayedSession:
    """One device relayed to the upstream; a DeviceLink for the offers."""

    __slots__ = (
        # the two connections, and what waits for each (outbox.py)
        "sock", "upstream_sock", "upstream", "streams", "_to_device", "_to_upstream", "_watchers",
        # who the device is, as the offers see it (a DeviceLink)
        "serial", "peer", "address", "token", "tag", "identity", "device_id", "session_id",
        "since", "presence", "report", "buff_in", "_url_base", "_info_msg_id", "_ready",
        # its settings and limits
        "devices", "online", "login_timeout", "server_host", "public_port", "read_timeout",
        "rate_limit", "_window", "_count",
        # its course: the login, the relaying, the end
        "_first", "_seen_early", "_closed", "_kept", "_ended", "_heard",
    )  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        address: tuple,
        devices: DeviceSide,
        online: OnlineDevices,
        upstream: Upstream,
        *,
        login_timeout: float,
        max_messages_per_sec: int = DEFAULT_MESSAGES_PER_SEC,
        server_host: str = "",
        public_port: int | None = None,
        ended: Callable[[], None] = lambda: None,
        first: bytes = b"",
    ) -> None:
        """`first`: bytes already read from the connection (a TLS one: its sniffed start)."""
        self.sock, self._first = sock, first
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            no_delay(sock)
        self.upstream_sock: socket.socket | None = None
        self.upstream = upstream
        self.streams = RelayStreams(MAX_DEVICE_BODY)
        self.serial = next(_SERIALS)
        self.peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.address = address[0] if isinstance(address, tuple) else str(address)
        self.devices, self.online = devices, online
        self.login_timeout = login_timeout
        self.server_host, self.public_port = server_host, public_port
        self.token, self.tag = "", "-"
        # Known once logged in: DeviceIdentity, its id, this session's id.
        self.identity, self.device_id, self.session_id = None, None, None
        self.since = utcnow()
        self.presence, self.report = None, None  # AsyncResults: the login's write, the report's
        self.buff_in = DEFAULT_BUFF_IN
        self.read_timeout = heartbeat_timeout(DEFAULT_HEARTBEAT)
        self.rate_limit, self._window, self._count = max_messages_per_sec, 0.0, 0
        self._info_msg_id = 0  # the device's info message, until the upstream answers it
        self._ready = False  # the upstream answered the info message: `ota` may go
        # `_kept`: the loop has the session; it owns both sockets, and says when it is over.
        self._closed, self._kept = False, False
        self._ended, self._url_base = ended, None
        self._watchers: dict[str, object] = {}
        self._to_device: Outbox | None = None  # what waits for each side (outbox.py)
        self._to_upstream: Outbox | TlsOutbox | None = None
        self._seen_early: list = []  # events after the login, read before it was answered

    # --- the login, in a greenlet ----------------------------------------------------

    def run(self) -> bool:
        """Log in through the upstream; True once the loop has the session (it owns
        the connections from then on): waiting for the upstream's answer on plain
        connections, relaying on TLS ones."""
        try:
            if isinstance(self.sock, ssl.SSLSocket) or self.upstream.context is not None:
                self._log_in_here()
            else:
                self._log_in_on_loop()
            self._kept = True
        except SessionClosed as reason:
            level = logging.DEBUG if "cannot be reached" in str(reason) else logging.INFO
            self._log(level, "%s", reason)
        except RemoteProtocolError as error:
            self._log(logging.INFO, "closed, %s", error)
        except TimeoutError:
            metrics.LOGIN_FAILURES.labels("no_login").inc()
            self._log(logging.INFO, "closed, no login answered in time")
        except OSError as error:
            self._log(logging.INFO, "connection lost (%s)", error)
        except Exception:
            log.exception("device %s %s: closed after an internal error", self.tag, self.peer)
        finally:
            if not self._kept:
                self._end_now()
                self._close()
        return self._kept

    def _log_in_here(self) -> None:
        """The whole login in this greenlet (a side speaks TLS: the ssl module may wait)."""
        login, self.upstream_sock, self._seen_early = log_in_upstream(
            self.sock, self.streams, self.upstream, self.login_timeout, self._first
        )
        self._first = b""
        self.token, self.tag = login.token, token_tag(login.token)
        self.login_answered(Status.OK)

    # --- the login, on the event loop (plain connections) -------------------------------

    def _log_in_on_loop(self) -> None:
        """Read the login here; the event loop does the rest (relay_login.LoopLogin)."""
        deadline = time.monotonic() + self.login_timeout
        login, login_bytes, self._seen_early = read_login(
            self.sock, self.streams, deadline, self._first
        )
        self._first = b""
        self.token, self.tag = login.token, token_tag(login.token)
        exchange = LoopLogin(self, login, login_bytes, deadline)
        self.upstream_sock = exchange.sock
        self._watchers["login"] = exchange

    def to_device(self, data: bytes) -> None:
        """The upstream's bytes to the device while the login is answered."""
        if self._to_device is None:
            self.sock.setblocking(False)
            self._to_device = Outbox(self.sock, self._device_failed, self._drained)
        self._to_device.send(data)

    def login_answered(self, status: int) -> None:
        """The upstream answered the login: 200 relays once the device is known
        here (adopted if new); anything else has gone to the device, and ends."""
        self._watchers.pop("login", None)  # it has closed its watchers
        if status != Status.OK:
            self._end(f"closed, the upstream refused the login (status {status})")
            return
        found = self.devices.find_device_later(self.token)
        found.rawlink(self._found)

    def _found(self, found: AsyncResult) -> None:
        if self._closed:
            return
        if found.successful() and found.value is None:  # new here: its row is written
            gevent.spawn(self.devices.adopt, self.token).rawlink(self._found)
            return
        if found.successful():
            self._accept(found.value)
        else:
            self._unrecorded(found.exception)
        self._relay()
        seen, self._seen_early = self._seen_early, []
        for event in seen:
            self._seen(event)

    def login_failed(self, error: BaseException) -> None:
        self._watchers.pop("login", None)
        if isinstance(error, TimeoutError):
            metrics.LOGIN_FAILURES.labels("no_login").inc()
            error = SessionClosed("closed, no login answered in time")
        self._end(str(error), quiet="cannot be reached" in str(error))

    def _unrecorded(self, error: BaseException) -> None:
        """The device keeps its Blynk server: relayed, without its updates until
        it logs in again with the database back."""
        if not isinstance(error, DATABASE_ERRORS):
            log.error("device %s %s: relayed without updates after an internal error",
                      self.tag, self.peer, exc_info=error)  # fmt: skip
            return
        metrics.SESSIONS_SHED.labels(shed_cause(error)).inc()
        self._log(logging.INFO, "relayed without updates: database error (%s)", error)

    def _accept(self, identity: DeviceIdentity) -> None:
        self.identity, self.token, self.device_id = identity, identity.token, identity.id
        go_online(self, identity)
        metrics.LOGINS.inc()
        metrics.RELAYED_SESSIONS.inc()
        log.debug("device %s %s: logged in through the upstream", self.tag, self.peer)

    # --- relaying, on the event loop -------------------------------------------------

    def _relay(self) -> None:
        """Hand both sockets to the event loop (a side that speaks TLS to greenlets:
        its records are read and written through the ssl module, which may wait)."""
        loop = get_hub().loop
        watch = self._watchers
        self._arm_deadline()
        if isinstance(self.sock, ssl.SSLSocket):
            watch["device reader"] = read_tls(self.sock, self._from_device, self._device_failed)
            self._to_device = TlsOutbox(self.sock, self._device_failed, self._drained)
        else:
            self.sock.setblocking(False)
            watch["device"] = loop.io(self.sock.fileno(), 1)
            watch["device"].start(self._device_readable)
            if self._to_device is None:  # made for the login's answer, on the loop
                self._to_device = Outbox(self.sock, self._device_failed, self._drained)
        if isinstance(self.upstream_sock, ssl.SSLSocket):
            watch["upstream reader"] = read_tls(
                self.upstream_sock, self._from_upstream, self._upstream_failed
            )
            self._to_upstream = TlsOutbox(self.upstream_sock, self._upstream_failed, self._drained)
        else:
            self.upstream_sock.setblocking(False)
            watch["upstream"] = loop.io(self.upstream_sock.fileno(), 1)
            watch["upstream"].start(self._upstream_readable)
            self._to_upstream = Outbox(self.upstream_sock, self._upstream_failed, self._drained)
        if "device" in watch:  # bytes sent while the login was answered wait in the socket
            self._device_readable()

    def _device_readable(self) -> None:
        if self._closed:
            return
        try:
            data = os.read(self._to_device.fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError as error:
            self._end(f"connection lost ({error})")
            return
        self._from_device(data)

    def _from_device(self, data: bytes) -> None:
        if self._closed:
            return
        if not data:
            self._end("disconnected", quiet=True)
            return
        before = self.streams.device_frames
        try:
            out, seen = self.streams.from_device(data)
        except RemoteProtocolError as error:
            self._end(f"closed, {error}")
            return
        frames = self.streams.device_frames - before
        if frames and over_rate(self, frames):
            self._end(str(over_rate_reason(self.rate_limit)))
            return
        if out:
            # Tally.inc, inline: these run for every frame relayed (metrics.py).
            metrics.RELAY_FRAMES_FROM_DEVICES.value += frames
            metrics.RELAY_BYTES_FROM_DEVICES.value += len(out)
            self._send(self._to_upstream, "device", out)
            self._heard = time.monotonic()
        for event in seen:
            self._seen(event)

    def _upstream_readable(self) -> None:
        if self._closed:
            return
        try:
            data = os.read(self._to_upstream.fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError as error:
            self._end(f"the upstream connection failed ({error})")
            return
        self._from_upstream(data)

    def _from_upstream(self, data: bytes) -> None:
        if self._closed:
            return
        if not data:
            self._end("the upstream closed the connection")
            return
        before = self.streams.upstream_frames
        out, answers = self.streams.from_upstream(data)
        if out:
            metrics.RELAY_FRAMES_FROM_UPSTREAM.value += self.streams.upstream_frames - before
            metrics.RELAY_BYTES_FROM_UPSTREAM.value += len(out)
            self._send(self._to_device, "upstream", out)
        for msg_id, status in answers:
            if msg_id == self._info_msg_id and self._info_msg_id:
                self._info_msg_id = 0
                if status == Status.OK and not self._ready:
                    self._ready = True  # the upstream answered the info message: `ota` may go
                    self.devices.fill_due.set()

    def _seen(self, event) -> None:
        """What blynkota reads of the device's frames: its info message."""
        if self.identity is None or not (isinstance(event, Internal) and event.is_info):
            return  # a second login, another INTERNAL frame: the upstream's to answer
        info = event.info()
        heartbeat, buff_in = info_number(info.get("h-beat")), info_number(info.get("buff-in"))
        if heartbeat:
            self.read_timeout = heartbeat_timeout(heartbeat)
            self._arm_deadline()
        if buff_in is not None:
            self.buff_in = buff_in
        self._info_msg_id = event.msg_id
        presence = self.presence
        if presence is not None and not presence.ready():
            presence.rawlink(lambda _: self._record(info))  # nothing durable before the login
        else:
            self._record(info)

    def _record(self, info: dict[str, str]) -> None:
        presence, self.presence = self.presence, None
        if self._closed:
            return
        if presence is not None and not (presence.successful() and presence.value):
            if presence.successful():  # a later login, on another node, holds the device
                self.devices.login_superseded(self.identity)
                self._end("closed, the device has logged in again since (on another node)")
            # The database's error: relaying goes on; the report waits for the next login.
            return
        self.report = self.devices.report_later(self.identity, info)
        build, hardware = printable(info.get("build", ""))[:64], printable(info.get("dev", ""))[:32]
        self.report.rawlink(lambda report: self._reported(report, build, hardware))

    def _reported(self, report: AsyncResult, build: str, hardware: str) -> None:
        if self.report is report:
            self.report = None
        if not report.successful():
            self._log(logging.INFO, "info message not recorded (%s)", report.exception)
            return
        due = ", update due" if report.value[1] else ""
        self._log(logging.INFO, "logged in (id %d), build %r, dev %r%s",
                  self.device_id, build, hardware, due)  # fmt: skip

    def _arm_deadline(self, seconds: float | None = None) -> None:
        """The device's silence deadline: read_timeout from now, or `seconds` from
        now. A frame only notes its time (`_heard`): a timer re-armed per frame costs more."""
        if not self._closed:
            if seconds is None:  # the relaying's start, a new h-beat
                self._heard, seconds = time.monotonic(), self.read_timeout
            deadline = self._watchers.get("deadline")
            self._watchers["deadline"] = rearmed(deadline, seconds, self._deadline_due)

    def _deadline_due(self) -> None:
        left = self.read_timeout - (time.monotonic() - self._heard)
        if left <= 0.001:
            self._end("closed, silent too long")
            return
        spent = self._watchers.pop("deadline")  # closed outside its own callback
        spent.stop()
        get_hub().loop.run_callback(spent.close)
        self._arm_deadline(left)  # heard since: the rest of the span from that frame

    # --- writing without waiting (outbox.py) --------------------------------------------

    def _send(self, outbox: Outbox | TlsOutbox, source: str, data: bytes) -> None:
        """To `outbox`'s side; past its limit the `source` side is not read until it drains."""
        outbox.send(data)
        if len(outbox.pending) > OUTPUT_LIMIT:  # outbox.full, on the hot path
            watcher = self._watchers.get(source)
            if watcher is not None:
                watcher.stop()

    def _drained(self) -> None:
        """A side caught up: read again whatever was paused for it."""
        if self._closed:
            return
        for side, callback, outbox in (
            ("device", self._device_readable, self._to_upstream),
            ("upstream", self._upstream_readable, self._to_device),
        ):
            watcher = self._watchers.get(side)
            if watcher is not None and not outbox.full:
                watcher.start(callback)

    def _device_failed(self, reason: str) -> None:
        self._end(f"the device's {reason}")

    def _upstream_failed(self, reason: str) -> None:
        self._end(f"the upstream {reason}")

    # --- DeviceLink --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready and not self._closed

    def ota_frame(self, path: str) -> tuple[str, bytes]:
        if not self.ready:
            raise OfferFailed("the device is not in session")
        if self._url_base is None:  # the connection's own address: asked once
            self._url_base = url_base(self.sock, self.server_host, self.public_port)
        url = self._url_base + path
        return url, ota_frame(url, self.buff_in)

    def write_frame(self, frame: bytes) -> None:
        """Blynkota's own frame, between two upstream frames (protocol/relay.py)."""
        if self._closed:
            raise OfferFailed("the device is not in session")
        self._to_device.send(self.streams.ours(frame))
        if self._closed:
            raise OfferFailed("the device did not take the frame")
        if self._to_device.full:
            self._end("closed, the device does not read")
            raise OfferFailed("the device does not read")

    def close(self, reason: str, *, quiet: bool = False) -> None:
        self._end(reason, quiet=quiet)

    # --- the end -------------------------------------------------------------------------

    def _end(self, reason: str, *, quiet: bool = False) -> None:
        """Close both sides at once; the bookkeeping gets a greenlet."""
        if self._closed:
            return
        self._log(logging.DEBUG if quiet else logging.INFO, "%s", reason)
        self._end_now()
        if self._kept:
            gevent.spawn(self._close)

    def _end_now(self) -> None:
        """Stop relaying and close both connections; the watchers are closed by `_close`."""
        self._closed = True
        for watcher in self._watchers.values():
            if not isinstance(watcher, gevent.Greenlet):
                watcher.stop()
            elif watcher is not gevent.getcurrent():
                watcher.kill(block=False)
        for outbox in (self._to_device, self._to_upstream):
            if outbox is not None:
                outbox.stop()
        for sock in (self.sock, self.upstream_sock):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _close(self) -> None:
        for watcher in self._watchers.values():
            if not isinstance(watcher, gevent.Greenlet):
                watcher.close()
        self._watchers = {}
        for outbox in (self._to_device, self._to_upstream):
            if outbox is not None:
                outbox.close()
        go_offline(self, self._after_offline)

    def _after_offline(self) -> None:
        if self.session_id is not None:
            metrics.RELAYED_SESSIONS.dec()
        if self._kept:
            self._ended()

    # --- plumbing --------------------------------------------------------------------------

    def _log(self, level: int, text: str, *args: object) -> None:
        device_line(log, level, self.tag, f"{self.peer} (relayed)", text, *args)
