"""One logged-in device: a greenlet reads its frames; others may write `ota` to it.

Reads are bounded by a deadline per phase: `hard.socket.idle.timeout` to log
in, then ceil(h-beat x 2.3) between frames, so a device that sends half a
frame, or one byte at a time, is closed like a silent one. Writes hold a lock
(the admin API writes from its own greenlet) and a timeout, so a client that
never reads cannot hold a greenlet forever. Pings are answered from memory:
the database is touched on login, info message and disconnect only. A
login's presence write is soft state, written behind its answer; the info
message, which can start an update, waits for it. The info message's
report is written behind its answer too: the session goes idle at once,
hears the outcome from the event loop, and handles a later frame only once
the report is durable.

An idle device holds no greenlet. Once its login is answered and no frame
is left to read, the session parks: the event loop watches its socket (an
io watcher) and its deadline (a timer), and the greenlet ends. When a frame
arrives the loop reads it and, where nothing about it must wait (a ping,
an info message once the login is written, anything ignored), answers it
with a send that never waits: a fleet's heartbeats and a storm's info
messages take no greenlet. Anything else (a frame that must wait for the
database, a second login, a bad frame, the end) goes to a new greenlet,
which goes on as a logged-in session does and parks again. The deadline's
timer closes a silent device. A greenlet costs about 8 KiB however little
it holds, which is more than the rest of an idle session.

A login needs no greenlet either when its frame is already in the socket as
the server accepts the connection, as a storm's are (`start_here`): the
loop reads it, looks the token up (remembered, or in the next batch of
lookups), answers, and parks the session, and handles the info message that
came with it as a parked session does. What it cannot finish without a wait
(half a frame, an unknown token, the database's error, a device that does
not read) goes on in a greenlet, exactly as a login read by one.

While the database is away a device gets SERVER_ERROR to its login or info
message and is closed; the outage is logged once (store.DatabaseHealth), not
once per device. A disconnect that could not be written is written when the
database is back (cluster/nodes.py).
"""

import contextlib
import functools
import itertools
import logging
import math
import os
import socket
import time
from collections.abc import Callable

import gevent
from gevent import get_hub
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .. import metrics
from ..logs import DEVICE_TAG, PER_TURN
from ..logsafe import DEVICE_LINES, CountsPerInterval, printable, token_tag
from ..ota import DeviceIdentity, FrameTooLarge, OfferFailed, OnlineDevices, OtaService
from ..protocol import (
    NEED_DATA,
    FrameReader,
    Ignored,
    Internal,
    LocalProtocolError,
    Login,
    Ping,
    RemoteProtocolError,
    Response,
    Status,
    Unknown,
    encode_ota,
    encode_response,
    info_number,
)
from ..store import is_locked, is_outage, utcnow
from .states import SessionState, SessionStateMachine

__all__ = ["DeviceSession", "heartbeat_timeout"]

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT = 10  # seconds, the C++ library's default h-beat
DEFAULT_BUFF_IN = 256  # bytes, an ESP's receive buffer in library v0.6.1
DEFAULT_MESSAGES_PER_SEC = 100  # the Blynk server's user.message.quota.limit
WRITE_TIMEOUT = 10.0
MAX_EXTRA_LOGINS = 3  # ALREADY_REGISTERED answers before a login flood is closed
# Devices exchange frames of a few bytes: a small kernel send buffer keeps
# memory low with thousands of connections, and a peer that never reads
# fills it, and is dropped, quickly.
SEND_BUFFER_BYTES = 16 * 1024


_SERIALS = itertools.count(1)


def heartbeat_timeout(heartbeat: int) -> float:
    return math.ceil(heartbeat * 2.3)


class FrameRate:
    """Frames a device sent in the current second, against its limit (the Blynk
    server's message quota): a fixed one-second window, one clock read a frame."""

    __slots__ = ("limit", "_window", "_count")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._window = 0.0
        self._count = 0

    def over(self) -> bool:
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._count = now, 0
        self._count += 1
        return self._count > self.limit


# `_handled_here`: an info message waits for the login's presence write.
_LOGIN_UNWRITTEN = object()

# Logged in, waiting for the info message or the next frame: the loop can watch.
_PARKABLE = frozenset((SessionState.LOGGED_IN, SessionState.READY))


class SessionClosed(Exception):
    """Ends the session quietly; the message is the one log line."""


# What a query raises while the database is away, or busy past the pool's wait.
DATABASE_ERRORS = (DBAPIError, PoolTimeout)
SHED_EVERY = 10.0  # seconds between two lines about sessions the database could not serve
_SHED_CAUSES = {
    "pool_timeout": "no pooled database connection free in time (db.pool.size)",
    "unreachable": "the database unreachable",
    "locked": "SQLite locked by another process",
    "error": "a database error",
}


def _tell_shed(counts: dict[str, int]) -> None:
    causes = ", ".join(f"{_SHED_CAUSES[cause]}: {count}" for cause, count in counts.items())
    log.warning(
        "%d device connection(s) closed in the last %g s, the database could not serve them (%s)",
        sum(counts.values()),
        SHED_EVERY,
        causes,
    )


# Sessions closed for the database: one line per SHED_EVERY, whatever their number.
SHED = CountsPerInterval(SHED_EVERY, _tell_shed)


def shed_cause(error: BaseException) -> str:
    if isinstance(error, PoolTimeout):
        return "pool_timeout"
    if is_outage(error):
        return "unreachable"
    return "locked" if is_locked(error) else "error"


class DeviceSession:
    # Tens of thousands are alive at once: slots instead of a dict each
    # (past 30 attributes an instance's dict is no longer a compact one).
    __slots__ = (
        "sock",
        "serial",
        "peer",
        "address",
        "service",
        "online",
        "login_timeout",
        "server_host",
        "public_port",
        "machine",
        "reader",
        "token",
        "tag",
        "identity",
        "device_id",
        "session_id",
        "_presence",
        "_report",
        "_report_msg_id",
        "since",
        "buff_in",
        "read_timeout",
        "_write_lock",
        "_extra_logins",
        "rate",
        "_ended",
        "_url_base",
        "_parked",
        "_wake_watch",
        "_deadline_timer",
    )

    def __init__(
        self,
        sock: socket.socket,
        address: tuple,
        service: OtaService,
        online: OnlineDevices,
        *,
        login_timeout: float,
        max_messages_per_sec: int = DEFAULT_MESSAGES_PER_SEC,
        server_host: str = "",
        public_port: int | None = None,
        ended: Callable[[], None] = lambda: None,
    ) -> None:
        """`ended` is called when a session that parked (`run` answered True) is over."""
        self.sock = sock
        self.serial = next(_SERIALS)
        # try/except rather than contextlib.suppress: three calls fewer a login.
        try:  # noqa: SIM105
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except OSError:
            pass  # a connection already reset: its first read says so
        self.peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.address = address[0] if isinstance(address, tuple) else str(address)
        self.service = service
        self.online = online
        self.login_timeout = login_timeout
        self.server_host = server_host
        self.public_port = public_port
        self.machine = SessionStateMachine()
        self.reader = FrameReader()
        self.token = ""
        self.tag = "-"  # what the log shows of the token (logsafe.py)
        self.identity: DeviceIdentity | None = None
        self.device_id: int | None = None
        self.session_id: int | None = None
        self._presence: AsyncResult | None = None  # the login's presence write, pending
        self._report: AsyncResult | None = None  # the last info message's report, pending
        self._report_msg_id = 0  # and the info message's id, to answer SERVER_ERROR
        # When the connection was accepted: of two logins of one device, the
        # later connection holds it, however late a busy node reads its frame.
        self.since = utcnow()
        self.buff_in = DEFAULT_BUFF_IN
        self.read_timeout = heartbeat_timeout(DEFAULT_HEARTBEAT)
        self._write_lock = Semaphore()
        self._extra_logins = 0
        self.rate = FrameRate(max_messages_per_sec)
        self._ended = ended
        self._url_base: str | None = None  # http://host:port of the download URLs
        self._parked = False  # the loop watches the socket; no greenlet runs the session
        # Made at the first park (or a start in the loop), reused. Once set, no
        # handler waits for the session: it closes its connection and says so.
        self._wake_watch = None
        self._deadline_timer = None  # made again only when the deadline changes

    # --- the greenlet --------------------------------------------------------

    def run(self) -> bool:
        """Serve the device until it closes, or until it parks: True if it parked
        (the connection stays open, owned by the session from then on)."""
        return self._guarded(self._from_login)

    def _from_login(
        self, event=None, error: BaseException | None = None, unknown: bool = False
    ) -> bool:
        if error is not None:
            raise error
        self._log_in(event, unknown=unknown)
        return self._serve()

    def _serve(self) -> bool:
        """Handle frames until none is left to read once logged in: then park (True)."""
        while True:
            if self.machine.state in _PARKABLE and not self.reader.buffered:
                if self._report is not None and self._report.ready():
                    self._report_settled()  # failed: raises (once done, `_reported` clears it)
                self._park()
                return True
            self._handle(self._next_event(self.read_timeout))

    def _guarded(self, body: Callable[[], bool]) -> bool:
        """Run `body`; every way a session ends is logged here, and closed."""
        parked = False
        try:
            parked = body()
        except DATABASE_ERRORS as error:
            cause = shed_cause(error)
            if cause == "pool_timeout":
                metrics.DATABASE_ERRORS.labels("pool_timeout").inc()
            metrics.SESSIONS_SHED.labels(cause).inc()
            SHED.add(cause)  # the device's own line is quiet: one line per SHED_EVERY
            self._log(logging.DEBUG, "closed, database error (%s)", error)
        except SessionClosed as reason:
            # A plain disconnect is routine; everything else is worth a line.
            level = logging.DEBUG if str(reason) == "disconnected" else logging.INFO
            self._log(level, "%s", reason)
        except RemoteProtocolError as error:
            if error.status is not None:
                self._try_reply(error.msg_id, error.status)
            self._log(logging.INFO, "closed, %s", error)
        except TimeoutError as error:
            self._log(
                logging.INFO, "closed, %s", error.args[0] if error.args else "silent too long"
            )
        except OSError as error:
            self._log(logging.INFO, "connection lost (%s)", error)
        except Exception:
            log.exception("device %s %s: closed after an internal error", self.tag, self.peer)
        finally:
            if not parked:
                self._close()
        return parked

    # --- logged in from the event loop ------------------------------------------

    def start_here(self) -> None:
        """Begin from the event loop, for a connection whose first bytes are a
        device's (the server's accept): a whole login frame already here is
        answered without a greenlet, and the session parks; anything else
        goes on in a greenlet of its own. Either way the session owns the
        connection from now on, and says when it is over (`ended`)."""
        # Made now rather than at the first park: `_close` reads it as "owned".
        self._wake_watch = get_hub().loop.io(self.sock.fileno(), 1)  # 1: readable
        try:
            # The socket is non-blocking (gevent's): a plain read never waits.
            data = os.read(self._wake_watch.fd, 4096)
            self.reader.feed(data)
            event = self._take_event() if data else NEED_DATA
        except Exception as error:  # reset, a bad frame: the greenlet logs and closes
            self._go_on(error=error)
            return
        if not isinstance(event, Login):
            # Half a frame, or the wrong one: the greenlet reads on, or refuses it.
            self._go_on(None if event is NEED_DATA else event)
            return
        found = self.service.find_device_later(event.token)
        if found.ready():  # a token this process remembers
            self._log_in_here(event, found)
        else:
            found.rawlink(functools.partial(self._log_in_here, event))

    def _log_in_here(self, event: Login, found: AsyncResult) -> None:
        if not found.successful():
            # The database's error: the greenlet asks again, and answers
            # SERVER_ERROR if it fails again.
            self._go_on(event)
            return
        if found.value is None:
            # An unknown token: the greenlet refuses it without asking again
            # (a flood of wrong tokens costs one lookup each, not two).
            self._go_on(event, unknown=True)
            return
        identity = found.value
        try:
            self._accept_login(identity)
            unsent = self._reply_here(event.msg_id, Status.OK)
        except Exception as error:  # a newer connection holds the device, or a bug
            self._go_on(error=error)  # the greenlet logs it and closes
            return
        metrics.LOGINS.inc()
        log.debug("device %s %s: logged in from the event loop", self.tag, self.peer)
        if unsent is not None:  # a device that does not read: the greenlet writes the rest
            if not unsent:
                unsent = encode_response(event.msg_id, Status.OK)
                self._write_lock.acquire(blocking=False)  # free: nothing else writes yet
            self._go_on_writing(unsent)
            return
        self._park()
        if self.reader.buffered:  # the info message came with the login (a storm's do)
            self._handle_buffered()

    def _go_on(
        self, event=None, *, error: BaseException | None = None, unknown: bool = False
    ) -> None:
        """From the loop, before the login is answered: a greenlet takes over
        (`unknown`: the login's token was looked up, and no device has it)."""
        gevent.spawn(self._guarded, functools.partial(self._from_login, event, error, unknown))

    def _go_on_writing(self, unsent: bytes) -> None:
        """From the loop, the login answered in part: a greenlet sends the rest."""
        gevent.spawn(self._guarded, functools.partial(self._resume, None, None, unsent))

    # --- parked: no greenlet while the device is idle ----------------------------

    def _park(self) -> None:
        if self._wake_watch is None:
            self._wake_watch = get_hub().loop.io(self.sock.fileno(), 1)  # 1: readable
        self._wake_watch.start(self._woken)
        self._arm_deadline()
        self._parked = True

    def _arm_deadline(self) -> None:
        """(Re)start the deadline between frames, as a blocking read has it
        (`_next_event`); an info message may have changed it."""
        timer = self._deadline_timer
        if timer is None or timer.at != self.read_timeout:
            if timer is not None:
                timer.close()
            timer = get_hub().loop.timer(self.read_timeout, self.read_timeout)
            self._deadline_timer = timer
        timer.again(self._silent_too_long)  # `again` restarts it after `repeat`

    def _unpark(self) -> bool:
        """Stop watching; True if the session was parked."""
        if not self._parked:
            return False
        self._parked = False
        self._wake_watch.stop()
        self._deadline_timer.stop()
        return True

    def _woken(self) -> None:
        """The parked socket is readable. Called by the event loop itself:
        nothing here may wait. What arrived is read and, where it needs no
        wait (a ping, an info message once the login is written, anything
        ignored), handled here; the rest goes to a new greenlet."""
        if not self._parked:
            return
        try:
            # The socket is non-blocking (gevent's): a plain read never waits.
            data = os.read(self._wake_watch.fd, 4096)
        except BlockingIOError:
            return  # woken for nothing: still parked
        except OSError as error:
            self._hand_over(error=error)
            return
        if not data:
            self._hand_over(error=self._closed_by_device())
            return
        self.reader.feed(data)
        self._handle_buffered()

    def _handle_buffered(self, event=None) -> None:
        """Handle `event` (if given), then every whole frame in the buffer, from
        the event loop; what must wait goes to a new greenlet."""
        handled = False
        while True:
            try:
                if event is None:
                    event = self._take_event()
                    if event is NEED_DATA:
                        break
                unsent = self._handled_here(event)
            except Exception as error:  # a flood, a bad frame: the greenlet ends it
                self._hand_over(error=error)
                return
            if unsent is _LOGIN_UNWRITTEN:
                self._await_login_write(event)
                return
            if unsent is not None:
                self._hand_over(event=None if unsent else event, unsent=unsent or None)
                return
            handled, event = True, None
        if handled:  # the deadline is between whole frames: a trickle does not move it
            self._arm_deadline()

    def _await_login_write(self, event) -> None:
        """An info message came before the login's presence write landed (a
        storm's devices send it at once): nothing durable before the login is.
        The loop stops reading the socket and handles the message when the
        write is known, without a greenlet; the deadline stays armed."""
        self._wake_watch.stop()
        self._presence.rawlink(functools.partial(self._login_written, event))

    def _login_written(self, event, _presence: AsyncResult) -> None:
        if not self._parked:
            return  # the deadline or a newer connection ended the session meanwhile
        self._wake_watch.start(self._woken)
        self._handle_buffered(event)

    def _hand_over(self, *, event=None, error: BaseException | None = None, unsent=None) -> None:
        """Unpark, and let a new greenlet go on from here."""
        if self._unpark():
            gevent.spawn(self._guarded, functools.partial(self._resume, event, error, unsent))

    def _resume(self, event, error: BaseException | None, unsent: bytes | None) -> bool:
        DEVICE_TAG.set(self.tag)  # a new greenlet: its log lines name the device again
        if error is not None:
            raise error
        if unsent is not None:
            try:
                self._send_all(unsent)
            finally:
                self._write_lock.release()  # taken when the part that went was sent
        if event is not None:
            self._handle(event)
        return self._serve()

    def _handled_here(self, event) -> bytes | object | None:
        """Handle `event` from the loop if nothing about it must wait.

        None: handled. b"": not touched, a greenlet handles it.
        _LOGIN_UNWRITTEN: not touched, handled here once the login's presence
        write is known. Otherwise the part of an answer the kernel did not
        take (a device that stopped reading): a greenlet writes it, with the
        write lock held until then.
        """
        if self._write_lock.locked():
            return b""  # another greenlet is in the middle of a write
        presence = self._presence
        if presence is not None:
            if presence.ready():
                if not (presence.successful() and presence.value):
                    return b""  # superseded, or failed: the greenlet says so and closes
                self._presence = None
            elif isinstance(event, Internal) and event.is_info:
                return _LOGIN_UNWRITTEN  # nothing durable before the login is
        report = self._report
        if report is not None:
            if not (report.ready() and report.successful()):
                return b""
            self._report = None
        if isinstance(event, Ping):
            return self._reply_here(event.msg_id, Status.OK)
        if isinstance(event, Internal) and event.is_info:
            return self._on_info(event, reply=self._reply_here)
        if isinstance(event, (Internal, Ignored, Response)):
            return None
        return b""  # a second login, an unknown command: the greenlet

    def _reply_here(self, msg_id: int, status: int) -> bytes | None:
        """Send a reply without waiting: None if it all went, else what did not
        (b"": nothing went). A part that went holds the write lock."""
        if not msg_id:
            return None
        frame = encode_response(msg_id, status)
        try:
            sent = self.sock.send(frame, 0, 0.0)
        except OSError:
            sent = 0  # a full buffer, or a broken connection the greenlet finds
        if sent == len(frame):
            return None
        if not sent:
            return b""
        self._write_lock.acquire(blocking=False)  # free: checked before handling
        return frame[sent:]

    def _silent_too_long(self) -> None:
        self._hand_over(error=TimeoutError("silent too long"))

    def _log_in(self, event=None, *, unknown: bool = False) -> None:
        """Read the login (unless the loop did: `event`) and answer it
        (`unknown`: the loop found no device with its token)."""
        if event is None:
            try:
                event = self._next_event(self.login_timeout)
            except TimeoutError:
                metrics.LOGIN_FAILURES.labels("no_login").inc()
                raise
        if not isinstance(event, Login):
            metrics.LOGIN_FAILURES.labels("no_login").inc()
            raise SessionClosed(f"closed, {type(event).__name__.lower()} before login")
        try:
            identity = None if unknown else self.service.find_device(event.token)
        except DATABASE_ERRORS:
            metrics.LOGIN_FAILURES.labels("database").inc()
            self._try_reply(event.msg_id, Status.SERVER_ERROR)
            raise
        if identity is None:
            metrics.LOGIN_FAILURES.labels("invalid_token").inc()
            self._reply(event.msg_id, Status.INVALID_TOKEN)
            raise SessionClosed(f"closed, invalid token ({token_tag(event.token)})")
        self._accept_login(identity)
        DEVICE_TAG.set(self.tag)  # every log line of this greenlet names the device (logs.py)
        self._reply(event.msg_id, Status.OK)
        metrics.LOGINS.inc()
        log.debug("device %s %s: logged in", self.tag, self.peer)

    def _accept_login(self, identity: DeviceIdentity) -> None:
        """The device is `identity`: register the session and queue its presence
        write. Never waits (the loop calls it too); the answer is the caller's."""
        self.identity = identity
        self.token, self.device_id = identity.token, identity.id
        self.tag = token_tag(identity.token)
        self.machine.advance("login accepted")
        # Registered before the database hears of it: the connection this one
        # replaces then finds itself unregistered and leaves the device online.
        registered, replaced = self.online.register(self)
        if not registered:
            metrics.LOGIN_FAILURES.labels("newer_connection").inc()
            raise SessionClosed("closed, the device has opened a newer connection")
        if replaced is not None:
            replaced.close("replaced by a new connection")
        self.session_id = self.service.node.new_session_id()
        # Written behind (presence is soft state): answered now, the write's
        # outcome is read before the info message, in `_presence_settled`.
        self._presence = self.service.device_online(
            identity, self.session_id, self.address, self.since
        )

    def _presence_settled(self, *, wait: bool) -> None:
        """Read the outcome of the login's presence write, once it is known.

        Raises the database's error, or ends the session if a later login
        (on another node) holds the device.
        """
        pending = self._presence
        if pending is None or not (wait or pending.ready()):
            return
        self._presence = None
        if not pending.get():
            self.service.login_superseded(self.identity)
            raise SessionClosed("closed, the device has logged in again since (on another node)")

    def _handle(self, event) -> None:
        # (A report is queued only once the login's write is settled: the order is free.)
        self._report_settled()
        if isinstance(event, Internal) and event.is_info:
            # It settles the login's write itself, answering SERVER_ERROR if it failed.
            self._on_info(event)
            return
        self._presence_settled(wait=False)
        if isinstance(event, Ping):
            self._reply(event.msg_id, Status.OK)
        elif isinstance(event, Login):
            self._extra_logins += 1
            if self._extra_logins > MAX_EXTRA_LOGINS:
                raise SessionClosed("closed, login flood")
            self._reply(event.msg_id, Status.ALREADY_REGISTERED)
        elif isinstance(event, Unknown):
            self._reply(event.msg_id, Status.ILLEGAL_COMMAND)
            raise SessionClosed(f"closed, unknown command {event.command}")
        elif isinstance(event, (Internal, Ignored, Response)):
            pass  # known, not needed for OTA: the Blynk server ignores them too

    def _on_info(self, event: Internal, reply: Callable | None = None) -> bytes | None:
        """Answer and record an info message. `reply` (from the loop, `_reply_here`)
        answers what it could not send; b"" stops here, for a greenlet to redo."""
        try:
            self._presence_settled(wait=True)  # nothing durable before the login is
        except DATABASE_ERRORS:
            self._try_reply(event.msg_id, Status.SERVER_ERROR)
            raise
        info = event.info()
        heartbeat, buff_in = info_number(info.get("h-beat")), info_number(info.get("buff-in"))
        if heartbeat:
            self.read_timeout = heartbeat_timeout(heartbeat)
        if buff_in is not None:
            self.buff_in = buff_in
        # The answer goes out before any `ota`: the PyPI client reads the reply
        # to its info message as the first frame it receives.
        unsent = (reply or self._reply)(event.msg_id, Status.OK)
        if unsent == b"":
            return unsent
        self.machine.advance("info answered")
        # The report joins the next group commit, and the session goes idle
        # without waiting for it: its outcome comes back from the event loop.
        # A frame the device sends meanwhile is handled once it is durable.
        self._report, self._report_msg_id = (
            self.service.report_later(self.identity, info),
            event.msg_id,
        )
        self._report.rawlink(
            functools.partial(
                self._reported,
                printable(info.get("build", ""))[:64],
                printable(info.get("dev", ""))[:32],
            )
        )
        return unsent

    def _reported(self, build: str, hardware: str, report: AsyncResult) -> None:
        """The info message's report committed, or failed. Called by the event
        loop itself: nothing here may wait."""
        if not report.successful():
            # Read by the session's greenlet (`_report_settled`); parked, it has none.
            if self._unpark():
                gevent.spawn(self._guarded, self._settle_and_serve)
            return
        if self._report is report:
            self._report = None
        # One line per login, with what an operator looks for (the token
        # only as its tag; the device id joins it to the tables).
        if DEVICE_LINES.take(self.tag):
            log.info(
                "device %s (id %d) %s: logged in, build %r, dev %r%s",
                self.tag,
                self.device_id,
                self.peer,
                build,
                hardware,
                ", update due" if report.value[1] else "",
                extra={"device": self.tag, **PER_TURN},
            )

    def _report_settled(self) -> None:
        """Wait for the last info message's report; raise its error, after
        telling the device (answered OK already, its report is lost: it
        reconnects and repeats it)."""
        pending = self._report
        if pending is None:
            return
        pending.wait()
        self._report = None
        if not pending.successful():
            self._try_reply(self._report_msg_id, Status.SERVER_ERROR)
            raise pending.exception

    def _settle_and_serve(self) -> bool:
        DEVICE_TAG.set(self.tag)
        self._report_settled()
        return self._serve()

    # --- DeviceLink, called from other greenlets too ---------------------------

    @property
    def ready(self) -> bool:
        return self.machine.state is SessionState.READY

    def ota_frame(self, path: str) -> tuple[str, bytes]:
        if not self.ready:
            raise OfferFailed("the device is not in session")
        url = self._url(path)
        try:
            return url, encode_ota(url, buff_in=self.buff_in)
        except LocalProtocolError as error:
            raise FrameTooLarge(str(error)) from None

    def _log(self, level: int, text: str, *args: object) -> None:
        """A line about this device, within its budget (logsafe.DeviceLines).
        Called from other greenlets and from the loop: the line names its device itself."""
        if log.isEnabledFor(level) and DEVICE_LINES.take(self.tag):
            log.log(
                level, "device %s %s: " + text, self.tag, self.peer, *args,
                extra={"device": self.tag},
            )  # fmt: skip

    def write_frame(self, frame: bytes) -> None:
        try:
            self._write(frame)
        except (OSError, TimeoutError) as error:
            self.close(f"write failed ({error})")
            raise OfferFailed(f"the device did not take the frame ({error})") from None

    def close(self, reason: str, *, quiet: bool = False) -> None:
        # Called from other greenlets and from the loop: the line names its device itself.
        self._log(logging.DEBUG if quiet else logging.INFO, "%s", reason)
        self.machine.advance("close")
        # Parked, nobody reads the socket to notice: the cleanup gets a greenlet.
        parked = self._unpark()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if parked:
            gevent.spawn(self._close)

    # --- plumbing ------------------------------------------------------------------

    def _url(self, path: str) -> str:
        if self._url_base is None:  # the connection's own address: asked once
            host, port = self.sock.getsockname()[:2]
            if self.server_host:
                host = self.server_host
            elif ":" in host:
                host = f"[{host}]"
            self._url_base = f"http://{host}:{self.public_port or port}"
        return self._url_base + path

    def _take_event(self):
        """The next whole frame in the buffer, or NEED_DATA; counted against the rate."""
        event = self.reader.next_event()
        if event is not NEED_DATA and self.rate.over():
            raise SessionClosed(
                f"closed, more than {self.rate.limit} frames in a second "
                "(hardware.max.messages.per.sec)"
            )
        return event

    def _next_event(self, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            event = self._take_event()
            if event is not NEED_DATA:
                if self.reader.buffered:
                    # More frames wait in the buffer: let every other greenlet
                    # run first, or a flood from one device holds the loop.
                    gevent.sleep(0)
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                raise TimeoutError from None
            if not data:
                raise self._closed_by_device()
            self.reader.feed(data)

    def _closed_by_device(self) -> SessionClosed:
        """The device closed its end: mid-frame, or between frames (routine)."""
        if self.reader.buffered:
            return SessionClosed("closed mid-frame by the device")
        return SessionClosed("disconnected")

    def _write(self, frame: bytes) -> None:
        with self._write_lock:
            self._send_all(frame)

    def _send_all(self, frame: bytes) -> None:
        # A frame is a few bytes and the kernel buffer is nearly always
        # free: one send that never waits (timeout 0.0) is the whole write,
        # without arming a timer. Only a device slow to read gets one.
        try:
            sent = self.sock.send(frame, 0, 0.0)
        except BlockingIOError:
            sent = 0
        if sent < len(frame):
            # The socket's own timeout is what the last read left (the login's,
            # when the loop answered since): the write has a deadline of its own.
            self.sock.settimeout(None)
            with gevent.Timeout(WRITE_TIMEOUT, TimeoutError("the device does not read")):
                self.sock.sendall(frame[sent:])

    def _reply(self, msg_id: int, status: int) -> None:
        # A v0.6.1 device drops frames with message id 0: such a request goes unanswered.
        if msg_id:
            self._write(encode_response(msg_id, status))

    def _try_reply(self, msg_id: int, status: int) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            self._reply(msg_id, status)

    def _close(self) -> None:
        if self._presence is not None:
            # The disconnect is written after the login, never before it.
            self._presence.wait()
        if self._report is not None:
            self._report.wait()  # and after the report, as when the session waited for it
        if self.session_id is not None and self.online.unregister(self):
            try:
                # Conditional on this session: a newer login elsewhere stays.
                self.service.device_offline(self.device_id, self.session_id)
            except DATABASE_ERRORS:
                log.debug("device %s: disconnect kept until the database is back", self.tag)
        if self.machine.state is not SessionState.CLOSED:
            self.machine.advance("close")
        self._unpark()
        for watcher in (self._wake_watch, self._deadline_timer):
            if watcher is not None:
                watcher.close()
        self.sock.close()
        if self._wake_watch is not None:  # it parked, or began in the loop: nobody waits for it
            self._ended()
