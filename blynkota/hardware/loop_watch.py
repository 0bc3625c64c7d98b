"""A session served by the event loop itself, without a greenlet.

An idle device holds no greenlet. Once its login is answered and no frame is
left to read, the session parks: the event loop watches its socket (an io
watcher) and its deadline (a timer), and the greenlet ends. When a frame
arrives the loop reads it and, where the conversation lets the loop give it
(protocol/conversation.py: a ping, an info message once the login is
written, anything ignored), answers it with a send that never waits: a
fleet's heartbeats and a storm's info messages take no greenlet. Anything
else (a frame that must wait for the database, a second login, a bad frame,
a deadline) goes to a new greenlet, which goes on as a logged-in session does
and parks again. A device that closes its connection between frames is ended
by the loop too (`end_here`), its disconnect written behind: a fleet's boards
come and go all day. The deadline's timer closes a silent device. A greenlet
costs about 8 KiB however little it holds, which is more than the rest of an
idle session.

A login needs no greenlet either when its frame is already in the socket as
the server accepts the connection, as a storm's are (`start`): the loop
reads it, looks the token up (remembered, or in the next batch of lookups),
answers, and parks the session, and handles the info message that came with
it as a parked session does. What it cannot finish without a wait (half a
frame, an unknown token, the database's error, a device that does not read)
goes on in a greenlet, exactly as a login read by one.

Everything here is called by the event loop: nothing may wait.
"""

import functools
import logging
import os
from collections.abc import Callable
from typing import Protocol

import gevent
from gevent import get_hub
from gevent.event import AsyncResult

from .. import metrics
from ..ota import DeviceIdentity, DeviceSide
from ..protocol import (
    INFO,
    NEED_DATA,
    Login,
    SessionStateMachine,
    Status,
    encode_response,
    reaction_to,
)
from .wire import READ_BYTES, Wire, rearmed

__all__ = ["LoopWatch", "WatchedSession"]

log = logging.getLogger("blynkota.hardware.session")

# `_handled_here`: an info message waits for the login's presence write.
_LOGIN_UNWRITTEN = object()


class WatchedSession(Protocol):
    """What the watch reads and calls of its session (session.py)."""

    wire: Wire
    devices: DeviceSide
    machine: SessionStateMachine
    presence: AsyncResult | None  # the login's presence write, pending
    report: AsyncResult | None  # the last info message's report, pending
    read_timeout: float
    tag: str
    peer: str

    def accept_login(self, identity: DeviceIdentity) -> None: ...

    def answer_info(self, event, reply: Callable | None = None) -> bytes | None: ...

    def guarded(self, body: Callable[[], bool]) -> bool: ...

    def from_login(self, event=None, error=None, unknown: bool = False) -> bool: ...

    def resume(self, event, error, unsent) -> bool: ...

    def end_here(self) -> None: ...


class LoopWatch:
    """The event loop's watch over one session's socket and deadline."""

    __slots__ = ("session", "io", "timer", "parked")

    def __init__(self, session: WatchedSession) -> None:
        self.session = session
        self.io = get_hub().loop.io(session.wire.sock.fileno(), 1)  # 1: readable
        self.timer = None  # made at the first park, again only when the deadline changes
        self.parked = False

    # --- begun in the loop --------------------------------------------------------

    def start(self) -> None:
        """Begin from the server's accept, for a connection whose first bytes are a
        device's: a whole login frame already here is answered without a
        greenlet, and the session parks; anything else goes on in a greenlet."""
        session = self.session
        try:
            # The socket is non-blocking (gevent's): a plain read never waits.
            data = os.read(self.io.fd, READ_BYTES)
            session.wire.reader.feed(data)
            event = session.wire.take_event() if data else NEED_DATA
        except Exception as error:  # reset, a bad frame: the greenlet logs and closes
            self._go_on(error=error)
            return
        if not isinstance(event, Login):
            # Half a frame, or the wrong one: the greenlet reads on, or refuses it.
            self._go_on(None if event is NEED_DATA else event)
            return
        found = session.devices.find_device_later(event.token)
        if found.ready():  # a token this process remembers
            self._log_in(event, found)
        else:
            found.rawlink(functools.partial(self._log_in, event))

    def _log_in(self, event: Login, found: AsyncResult) -> None:
        session = self.session
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
        try:
            session.accept_login(found.value)
            unsent = session.wire.reply_now(event.msg_id, Status.OK)
        except Exception as error:  # a newer connection holds the device, or a bug
            self._go_on(error=error)  # the greenlet logs it and closes
            return
        metrics.LOGINS.inc()
        log.debug("device %s %s: logged in from the event loop", session.tag, session.peer)
        if unsent is not None:  # a device that does not read: the greenlet writes the rest
            if not unsent:
                unsent = encode_response(event.msg_id, Status.OK)
                session.wire.write_lock.acquire(blocking=False)  # free: nothing else writes yet
            gevent.spawn(session.guarded, functools.partial(session.resume, None, None, unsent))
            return
        self.park()
        if session.wire.reader.buffered:  # the info message came with the login (a storm's do)
            self._handle_buffered()

    def _go_on(self, event=None, *, error: BaseException | None = None, unknown: bool = False):
        """Before the login is answered: a greenlet takes over (`unknown`: the
        login's token was looked up, and no device has it)."""
        session = self.session
        gevent.spawn(session.guarded, functools.partial(session.from_login, event, error, unknown))

    # --- parked -------------------------------------------------------------------

    def park(self) -> None:
        self.io.start(self._woken)
        self.arm_deadline()
        self.parked = True

    def arm_deadline(self) -> None:
        """(Re)start the deadline between frames, as a blocking read has it
        (`Wire.next_event`); an info message may have changed it."""
        self.timer = rearmed(self.timer, self.session.read_timeout, self._silent_too_long)

    def unpark(self) -> bool:
        """Stop watching; True if the session was parked."""
        if not self.parked:
            return False
        self.parked = False
        self.io.stop()
        self.timer.stop()
        return True

    def close(self) -> None:
        self.unpark()
        self.io.close()
        if self.timer is not None:
            self.timer.close()

    def _silent_too_long(self) -> None:
        self.hand_over(error=TimeoutError("silent too long"))

    def _woken(self) -> None:
        """The parked socket is readable: what arrived is read, and handled."""
        if not self.parked:
            return
        try:
            # The socket is non-blocking (gevent's): a plain read never waits.
            data = os.read(self.io.fd, READ_BYTES)
        except BlockingIOError:
            return  # woken for nothing: still parked
        except OSError as error:
            self.hand_over(error=error)
            return
        if not data:
            if self.session.wire.reader.buffered:  # mid-frame: the greenlet says so
                self.hand_over(error=self.session.wire.closed_by_device())
            else:
                self.session.end_here()  # a plain disconnect: ended here
            return
        self.session.wire.reader.feed(data)
        self._handle_buffered()

    def _handle_buffered(self, event=None) -> None:
        """Handle `event` (if given), then every whole frame in the buffer; what
        must wait goes to a new greenlet."""
        handled = False
        while True:
            try:
                if event is None:
                    event = self.session.wire.take_event()
                    if event is NEED_DATA:
                        break
                unsent = self._handled_here(event)
            except Exception as error:  # a flood, a bad frame: the greenlet ends it
                self.hand_over(error=error)
                return
            if unsent is _LOGIN_UNWRITTEN:
                self._await_login_write(event)
                return
            if unsent is not None:
                self.hand_over(event=None if unsent else event, unsent=unsent or None)
                return
            handled, event = True, None
        if handled:  # the deadline is between whole frames: a trickle does not move it
            self.arm_deadline()

    def _handled_here(self, event) -> bytes | object | None:
        """Give `event` what the conversation says, if nothing about it must wait.

        None: handled. b"": not touched, a greenlet handles it.
        _LOGIN_UNWRITTEN: not touched, handled here once the login's presence
        write is known. Otherwise the part of an answer the kernel did not
        take (a device that stopped reading): a greenlet writes it, with the
        write lock held until then.
        """
        session = self.session
        if session.wire.writing():
            return b""  # another greenlet is in the middle of a write
        reaction = reaction_to(session.machine.state, event)
        presence = session.presence
        if presence is not None:
            if presence.ready():
                if not (presence.successful() and presence.value):
                    return b""  # superseded, or failed: the greenlet says so and closes
                session.presence = None
            elif reaction is INFO:
                return _LOGIN_UNWRITTEN  # nothing durable before the login is
        report = session.report
        if report is not None:
            if not (report.ready() and report.successful()):
                return b""
            session.report = None
        if not reaction.in_loop:
            return b""  # a second login, an unknown command: the greenlet
        if reaction is INFO:
            return session.answer_info(event, reply=session.wire.reply_now)
        if reaction.reply is not None:
            return session.wire.reply_now(event.msg_id, reaction.reply)
        return None

    def _await_login_write(self, event) -> None:
        """An info message came before the login's presence write landed (a
        storm's devices send it at once): nothing durable before the login is.
        The loop stops reading the socket and handles the message when the
        write is known, without a greenlet; the deadline stays armed."""
        self.io.stop()
        self.session.presence.rawlink(functools.partial(self._login_written, event))

    def _login_written(self, event, _presence: AsyncResult) -> None:
        if not self.parked:
            return  # the deadline or a newer connection ended the session meanwhile
        self.io.start(self._woken)
        self._handle_buffered(event)

    def hand_over(self, *, event=None, error: BaseException | None = None, unsent=None) -> None:
        """Unpark, and let a new greenlet go on from here."""
        if self.unpark():
            session = self.session
            gevent.spawn(session.guarded, functools.partial(session.resume, event, error, unsent))
