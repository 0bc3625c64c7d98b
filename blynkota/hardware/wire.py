"""One device's connection as frames: reads with a deadline, the frame rate,
and writes that never hold a greenlet forever.

Reads are bounded by a deadline per phase (the session gives it: the login
timeout, then ceil(h-beat x 2.3) between frames), so a device that sends half
a frame, or one byte at a time, is closed like a silent one. Writes hold a
lock (the admin API and the offers write from their own greenlets) and a
timeout, so a client that never reads cannot hold a greenlet forever.
"""

import contextlib
import math
import socket
import time

import gevent
from gevent import get_hub
from gevent.lock import Semaphore

from ..ota import FrameTooLarge
from ..protocol import NEED_DATA, FrameReader, LocalProtocolError, encode_ota, encode_response

__all__ = [
    "DEFAULT_BUFF_IN",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_MESSAGES_PER_SEC",
    "SessionClosed",
    "Wire",
    "heartbeat_timeout",
    "no_delay",
    "ota_frame",
    "rearmed",
    "url_base",
]

DEFAULT_HEARTBEAT = 10  # seconds, the C++ library's default h-beat
DEFAULT_BUFF_IN = 256  # bytes, an ESP's receive buffer in library v0.6.1
DEFAULT_MESSAGES_PER_SEC = 100  # the Blynk server's user.message.quota.limit
WRITE_TIMEOUT = 10.0
# Devices exchange frames of a few bytes: a small kernel send buffer keeps
# memory low with thousands of connections, and a peer that never reads
# fills it, and is dropped, quickly.
SEND_BUFFER_BYTES = 16 * 1024
READ_BYTES = 4096


def heartbeat_timeout(heartbeat: int) -> float:
    return math.ceil(heartbeat * 2.3)


def rearmed(timer, seconds: float, expired):
    """A silence deadline restarted on the event loop: `timer` again, or a new
    one when the span changed (an info message's h-beat)."""
    if timer is None or timer.at != seconds:
        if timer is not None:
            timer.close()
        timer = get_hub().loop.timer(seconds, seconds)
    timer.again(expired)  # `again` restarts it after `repeat`
    return timer


def url_base(sock: socket.socket, server_host: str, public_port: int | None) -> str:
    """http://host:port of the download URLs sent on this connection: server.host,
    or the address the device connected to."""
    host, port = sock.getsockname()[:2]
    if server_host:
        host = server_host
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{public_port or port}"


def ota_frame(url: str, buff_in: int) -> bytes:
    """The `ota` frame for `url`; FrameTooLarge if the device's buffer cannot take it."""
    try:
        return encode_ota(url, buff_in=buff_in)
    except LocalProtocolError as error:
        raise FrameTooLarge(str(error)) from None


def over_rate(holder, frames: int) -> bool:
    """Count `frames` against the rate of `holder` (a Wire, a relayed session: its
    rate_limit, _window and _count slots); True past rate_limit in this second."""
    now = time.monotonic()
    if now - holder._window >= 1.0:
        holder._window, holder._count = now, 0
    holder._count += frames
    return holder._count > holder.rate_limit


def over_rate_reason(rate_limit: int) -> "SessionClosed":
    return SessionClosed(
        f"closed, more than {rate_limit} frames in a second (hardware.max.messages.per.sec)"
    )


class SessionClosed(Exception):
    """Ends the session quietly; the message is the one log line."""


def no_delay(sock: socket.socket) -> None:
    """Each write goes out at once (TCP_NODELAY, as the Blynk server's sockets).

    Every write here is a whole frame or frames. With Nagle's algorithm a
    frame written while the last one is unacknowledged would wait for the
    peer's ACK, which a board's TCP stack may delay by up to 250 ms (lwIP's
    delayed ACK): the `ota` frame after a login's answer, a relayed frame
    after the one before it."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Wire:
    """The socket, its frame reader, the frame rate (the Blynk server's message
    quota: a fixed one-second window, one clock read a frame) and the write lock."""

    # Tens of thousands are alive at once: slots, and the rate's two numbers
    # here rather than in an object of their own.
    __slots__ = ("sock", "reader", "_write_lock", "rate_limit", "_window", "_count")

    def __init__(self, sock: socket.socket, max_messages_per_sec: int) -> None:
        self.sock = sock
        # try/except rather than contextlib.suppress: three calls fewer a login.
        try:  # noqa: SIM105
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            no_delay(sock)
        except OSError:
            pass  # a connection already reset: its first read says so
        self.reader = FrameReader()
        self._write_lock: Semaphore | None = None  # made at the first write that may wait
        self.rate_limit = max_messages_per_sec
        self._window = 0.0
        self._count = 0

    # --- reading ----------------------------------------------------------------

    def take_event(self):
        """The next whole frame in the buffer, or NEED_DATA; counted against the rate."""
        event = self.reader.next_event()
        if event is not NEED_DATA and over_rate(self, 1):
            raise over_rate_reason(self.rate_limit)
        return event

    def next_event(self, timeout: float):
        """The next frame, reading (and waiting) as long as `timeout` allows."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.take_event()
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
                data = self.sock.recv(READ_BYTES)
            except TimeoutError:
                raise TimeoutError from None
            if not data:
                raise self.closed_by_device()
            self.reader.feed(data)

    def closed_by_device(self) -> SessionClosed:
        """The device closed its end: mid-frame, or between frames (routine)."""
        if self.reader.buffered:
            return SessionClosed("closed mid-frame by the device")
        return SessionClosed("disconnected")

    # --- writing ----------------------------------------------------------------

    @property
    def write_lock(self) -> Semaphore:
        """Whoever writes holds it, so frames never interleave. Made when first
        asked for (never twice: nothing yields in between): most of a fleet's
        sessions are answered from the event loop and never need one, and a
        lock is about 170 bytes of the ~3 KiB a parked session costs."""
        lock = self._write_lock
        if lock is None:
            lock = self._write_lock = Semaphore()
        return lock

    def writing(self) -> bool:
        """Whether another write holds the lock now."""
        return self._write_lock is not None and self._write_lock.locked()

    def write(self, frame: bytes) -> None:
        with self.write_lock:
            self.send_all(frame)

    def send_all(self, frame: bytes) -> None:
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

    def reply(self, msg_id: int, status: int) -> None:
        # A v0.6.1 device drops frames with message id 0: such a request goes unanswered.
        if msg_id:
            self.write(encode_response(msg_id, status))

    def try_reply(self, msg_id: int, status: int) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            self.reply(msg_id, status)

    def reply_now(self, msg_id: int, status: int) -> bytes | None:
        """Send a reply without waiting (from the event loop): None if it all
        went, else what did not (b"": nothing went). A part that went holds
        the write lock, for the greenlet that sends the rest."""
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
        self.write_lock.acquire(blocking=False)  # free: checked before handling
        return frame[sent:]
