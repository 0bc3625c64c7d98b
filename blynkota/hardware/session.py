"""One device's session: who runs it, and in which order it writes.

A greenlet reads the device's frames (`run`), or the event loop does while
the session is parked (loop_watch.py); both give each frame what the
conversation says (protocol/conversation.py). Others may write `ota` to it
(the offers, from their own greenlets). The connection's reads, rate and
writes are the Wire's (wire.py).

Pings are answered from memory: the database is touched on login, info
message and disconnect only. A login's presence write is soft state,
written behind its answer; the info message, which can start an update,
waits for it. The info message's report is written behind its answer too:
the session goes idle at once, hears the outcome from the event loop, and
handles a later frame only once the report is durable.

While the database is away a device gets SERVER_ERROR to its login or info
message and is closed (shedding.py). A disconnect that could not be written
is written when the database is back (cluster/nodes.py).
"""

import contextlib
import functools
import itertools
import logging
import socket
import ssl
from collections.abc import Callable

import gevent
from gevent.event import AsyncResult

from .. import metrics
from ..logs import DEVICE_TAG, PER_TURN
from ..logsafe import DEVICE_LINES, device_line, printable, token_tag
from ..ota import DeviceIdentity, DeviceSide, OfferFailed, OnlineDevices
from ..protocol import (
    ALREADY_REGISTERED,
    INFO,
    LOG_IN,
    MAX_EXTRA_LOGINS,
    Internal,
    RemoteProtocolError,
    SessionState,
    SessionStateMachine,
    Status,
    info_number,
    reaction_to,
)
from ..store import utcnow
from .loop_watch import LoopWatch
from .presence import go_offline, go_online
from .shedding import DATABASE_ERRORS, SHED, shed_cause
from .wire import (
    DEFAULT_BUFF_IN,
    DEFAULT_HEARTBEAT,
    DEFAULT_MESSAGES_PER_SEC,
    SessionClosed,
    Wire,
    heartbeat_timeout,
    ota_frame,
    url_base,
)

__all__ = ["DeviceSession"]

log = logging.getLogger(__name__)

_SERIALS = itertools.count(1)

# Logged in, waiting for the info message or the next frame: the loop can watch.
_PARKABLE = frozenset((SessionState.LOGGED_IN, SessionState.READY))


class DeviceSession:
    # Tens of thousands are alive at once: slots instead of a dict each.
    __slots__ = (
        "wire",
        "serial",
        "peer",
        "devices",
        "online",
        "login_timeout",
        "server_host",
        "public_port",
        "machine",
        "token",
        "tag",
        "identity",
        "device_id",
        "session_id",
        "presence",
        "report",
        "_report_msg_id",
        "since",
        "buff_in",
        "read_timeout",
        "_extra_logins",
        "_ended",
        "_url_base",
        "watch",
        "_parks",
    )

    def __init__(
        self,
        sock: socket.socket,
        address: tuple,
        devices: DeviceSide,
        online: OnlineDevices,
        *,
        login_timeout: float,
        max_messages_per_sec: int = DEFAULT_MESSAGES_PER_SEC,
        server_host: str = "",
        public_port: int | None = None,
        ended: Callable[[], None] = lambda: None,
        first: bytes = b"",
    ) -> None:
        """`ended` is called when a session that parked (`run` answered True) is over.
        `first`: bytes already read from the connection (a TLS one: its sniffed start).
        A TLS session never parks: the event loop cannot read its records."""
        self.wire = Wire(sock, max_messages_per_sec)
        if first:
            self.wire.reader.feed(first)
        self._parks = not isinstance(sock, ssl.SSLSocket)
        self.serial = next(_SERIALS)
        self.peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.devices = devices
        self.online = online
        self.login_timeout = login_timeout
        self.server_host = server_host
        self.public_port = public_port
        self.machine = SessionStateMachine()
        self.token = ""
        self.tag = "-"  # what the log shows of the token (logsafe.py)
        self.identity: DeviceIdentity | None = None
        self.device_id: int | None = None
        self.session_id: int | None = None
        self.presence: AsyncResult | None = None  # the login's presence write, pending
        self.report: AsyncResult | None = None  # the last info message's report, pending
        self._report_msg_id = 0  # and the info message's id, to answer SERVER_ERROR
        # When the connection was accepted: of two logins of one device, the
        # later connection holds it, however late a busy node reads its frame.
        self.since = utcnow()
        self.buff_in = DEFAULT_BUFF_IN
        self.read_timeout = heartbeat_timeout(DEFAULT_HEARTBEAT)
        self._extra_logins = 0
        self._ended = ended
        self._url_base: str | None = None  # http://host:port of the download URLs
        # Made at the first park (or a start in the loop), reused. Once set, no
        # handler waits for the session: it closes its connection and says so.
        self.watch: LoopWatch | None = None

    @property
    def address(self) -> str:
        """The peer's address without its port (its presence row's): read at
        login and when presence is reconciled, so not kept beside `peer`."""
        host, colon, _ = self.peer.rpartition(":")
        return host if colon else self.peer

    # --- who runs it ---------------------------------------------------------------

    def run(self) -> bool:
        """Serve the device in this greenlet until it closes, or until it parks: True
        if it parked (the connection stays open, owned by the session from then on)."""
        return self.guarded(self.from_login)

    def start_here(self) -> None:
        """Begin from the event loop (the server's accept): see loop_watch.py. The
        session owns the connection from now on, and says when it is over (`ended`)."""
        # Made now rather than at the first park: `_close` reads it as "owned".
        self.watch = LoopWatch(self)
        self.watch.start()

    def from_login(
        self, event=None, error: BaseException | None = None, unknown: bool = False
    ) -> bool:
        if error is not None:
            raise error
        self._log_in(event, unknown=unknown)
        return self._serve()

    def resume(self, event, error: BaseException | None, unsent: bytes | None) -> bool:
        """In a new greenlet, where the event loop stopped (loop_watch.py)."""
        DEVICE_TAG.set(self.tag)  # a new greenlet: its log lines name the device again
        if error is not None:
            raise error
        if unsent is not None:
            try:
                self.wire.send_all(unsent)
            finally:
                self.wire.write_lock.release()  # taken when the part that went was sent
        if event is not None:
            self._handle(event)
        return self._serve()

    def _serve(self) -> bool:
        """Handle frames until none is left to read once logged in: then park (True)."""
        while True:
            if self._parks and self.machine.state in _PARKABLE and not self.wire.reader.buffered:
                if self.report is not None and self.report.ready():
                    self._report_settled()  # failed: raises (once done, `_reported` clears it)
                if self.watch is None:
                    self.watch = LoopWatch(self)
                self.watch.park()
                return True
            self._handle(self.wire.next_event(self.read_timeout))

    def guarded(self, body: Callable[[], bool]) -> bool:
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
                self.wire.try_reply(error.msg_id, error.status)
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

    # --- the conversation, in a greenlet ------------------------------------------

    def _log_in(self, event=None, *, unknown: bool = False) -> None:
        """Read the login (unless the loop did: `event`) and answer it
        (`unknown`: the loop found no device with its token)."""
        if event is None:
            try:
                event = self.wire.next_event(self.login_timeout)
            except TimeoutError:
                metrics.LOGIN_FAILURES.labels("no_login").inc()
                raise
        if reaction_to(self.machine.state, event) is not LOG_IN:
            metrics.LOGIN_FAILURES.labels("no_login").inc()
            raise SessionClosed(f"closed, {type(event).__name__.lower()} before login")
        try:
            identity = None if unknown else self.devices.find_device(event.token)
        except DATABASE_ERRORS:
            metrics.LOGIN_FAILURES.labels("database").inc()
            self.wire.try_reply(event.msg_id, Status.SERVER_ERROR)
            raise
        if identity is None:
            metrics.LOGIN_FAILURES.labels("invalid_token").inc()
            self.wire.reply(event.msg_id, Status.INVALID_TOKEN)
            raise SessionClosed(f"closed, invalid token ({token_tag(event.token)})")
        self.accept_login(identity)
        DEVICE_TAG.set(self.tag)  # every log line of this greenlet names the device (logs.py)
        self.wire.reply(event.msg_id, Status.OK)
        metrics.LOGINS.inc()
        log.debug("device %s %s: logged in", self.tag, self.peer)

    def _handle(self, event) -> None:
        reaction = reaction_to(self.machine.state, event)
        # (A report is queued only once the login's write is settled: the order is free.)
        self._report_settled()
        if reaction is INFO:
            # It settles the login's write itself, answering SERVER_ERROR if it failed.
            self.answer_info(event)
            return
        self._presence_settled(wait=False)
        if reaction is ALREADY_REGISTERED:
            self._extra_logins += 1
            if self._extra_logins > MAX_EXTRA_LOGINS:
                raise SessionClosed("closed, login flood")
        if reaction.reply is not None:
            self.wire.reply(event.msg_id, reaction.reply)
        if reaction.closes:
            raise SessionClosed(f"closed, unknown command {event.command}")

    # --- shared by the greenlet and the loop: nothing here waits -------------------

    def accept_login(self, identity: DeviceIdentity) -> None:
        """The device is `identity`: register the session and queue its presence
        write. Never waits (the loop calls it too); the answer is the caller's."""
        self.identity = identity
        self.token, self.device_id = identity.token, identity.id
        self.tag = token_tag(identity.token)
        self.machine.advance("login accepted")
        # Answered now; the presence write's outcome is read before the info
        # message, in `_presence_settled`.
        go_online(self, identity)

    def answer_info(self, event: Internal, reply: Callable | None = None) -> bytes | None:
        """Answer and record an info message. `reply` (from the loop, `Wire.reply_now`)
        answers what it could not send; b"" stops here, for a greenlet to redo."""
        try:
            self._presence_settled(wait=True)  # nothing durable before the login is
        except DATABASE_ERRORS:
            self.wire.try_reply(event.msg_id, Status.SERVER_ERROR)
            raise
        info = event.info()
        heartbeat, buff_in = info_number(info.get("h-beat")), info_number(info.get("buff-in"))
        if heartbeat:
            self.read_timeout = heartbeat_timeout(heartbeat)
        if buff_in is not None:
            self.buff_in = buff_in
        # The answer goes out before any `ota`: the PyPI client reads the reply
        # to its info message as the first frame it receives.
        unsent = (reply or self.wire.reply)(event.msg_id, INFO.reply)
        if unsent == b"":
            return unsent
        self.machine.advance("info answered")
        # The report joins the next group commit, and the session goes idle
        # without waiting for it: its outcome comes back from the event loop.
        # A frame the device sends meanwhile is handled once it is durable.
        self.report, self._report_msg_id = (
            self.devices.report_later(self.identity, info),
            event.msg_id,
        )
        self.report.rawlink(
            functools.partial(
                self._reported,
                printable(info.get("build", ""))[:64],
                printable(info.get("dev", ""))[:32],
            )
        )
        return unsent

    def _presence_settled(self, *, wait: bool) -> None:
        """Read the outcome of the login's presence write, once it is known.

        Raises the database's error, or ends the session if a later login
        (on another node) holds the device.
        """
        pending = self.presence
        if pending is None or not (wait or pending.ready()):
            return
        self.presence = None
        if not pending.get():
            self.devices.login_superseded(self.identity)
            raise SessionClosed("closed, the device has logged in again since (on another node)")

    def _reported(self, build: str, hardware: str, report: AsyncResult) -> None:
        """The info message's report committed, or failed. Called by the event
        loop itself: nothing here may wait."""
        if not report.successful():
            # Read by the session's greenlet (`_report_settled`); parked, it has none.
            if self.watch is not None and self.watch.unpark():
                gevent.spawn(self.guarded, self._settle_and_serve)
            return
        if self.report is report:
            self.report = None
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
        pending = self.report
        if pending is None:
            return
        pending.wait()
        self.report = None
        if not pending.successful():
            self.wire.try_reply(self._report_msg_id, Status.SERVER_ERROR)
            raise pending.exception

    def end_here(self) -> None:
        """The device closed its parked connection between frames (seen by the
        event loop): the session ends on the loop, without a greenlet, as one
        would end it (`_close`). A fleet's devices come and go all day."""
        if self.watch is None or not self.watch.unpark():
            return
        self._log(logging.DEBUG, "disconnected")
        go_offline(self, self._after_offline)

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
        if self._url_base is None:  # the connection's own address: asked once
            self._url_base = url_base(self.wire.sock, self.server_host, self.public_port)
        url = self._url_base + path
        return url, ota_frame(url, self.buff_in)

    def write_frame(self, frame: bytes) -> None:
        try:
            self.wire.write(frame)
        except (OSError, TimeoutError) as error:
            self.close(f"write failed ({error})")
            raise OfferFailed(f"the device did not take the frame ({error})") from None

    def close(self, reason: str, *, quiet: bool = False) -> None:
        # Called from other greenlets and from the loop: the line names its device itself.
        self._log(logging.DEBUG if quiet else logging.INFO, "%s", reason)
        self.machine.advance("close")
        # Parked, nobody reads the socket to notice: the cleanup gets a greenlet.
        parked = self.watch is not None and self.watch.unpark()
        sock = self.wire.sock
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        if parked:
            gevent.spawn(self._close)

    # --- plumbing ------------------------------------------------------------------

    def _log(self, level: int, text: str, *args: object) -> None:
        """A line about this device, within its budget (logsafe.DeviceLines).
        Called from other greenlets and from the loop: the line names its device itself."""
        device_line(log, level, self.tag, self.peer, text, *args)

    def _close(self) -> None:
        go_offline(self, self._after_offline)

    def _after_offline(self) -> None:
        """Once the disconnect is queued: the connection closed, the session counted out."""
        if self.machine.state is not SessionState.CLOSED:
            self.machine.advance("close")
        if self.watch is not None:
            self.watch.close()
        self.wire.sock.close()
        if self.watch is not None:  # it parked, or began in the loop: nobody waits for it
            self._ended()
