"""A relayed device's login: the upstream Blynk server decides it.

The device's first frame must be a login (LOGIN or HW_LOGIN), as on any
Blynk server. Blynkota opens the upstream connection, passes the login on as
it came, and passes the upstream's bytes back until the login is answered:
200 makes a relayed session; any other answer has reached the device, and
both sides close. The whole exchange is bounded by the login timeout.
"""

import contextlib
import os
import socket
import time
from typing import Protocol

from gevent import get_hub

from .. import metrics
from ..protocol import Command, Login, Status, encode_response
from ..protocol.relay import RelayStreams
from .upstream import Upstream
from .wire import READ_BYTES, WRITE_TIMEOUT, SessionClosed

__all__ = ["LoopLogin", "log_in_upstream", "read_login"]


def read_login(
    sock: socket.socket, streams: RelayStreams, deadline: float, first: bytes = b""
) -> tuple[Login, bytes, list]:
    """The device's login, its bytes as they came, and the events after it in its
    segment (an info message, say). `first`: bytes already read from the
    connection (a TLS one's). Raises SessionClosed (not a login, a malformed
    token: answered as the standalone server does) or TimeoutError."""
    login_bytes, seen = streams.from_device(first) if first else (b"", [])
    while not login_bytes:
        login_bytes, seen = streams.from_device(_recv(sock, deadline))
    if login_bytes[0] not in (Command.HW_LOGIN, Command.LOGIN):
        metrics.LOGIN_FAILURES.labels("no_login").inc()
        raise SessionClosed("closed, a frame before login")
    login = seen[0] if seen and isinstance(seen[0], Login) else None
    if login is None:  # a token no Blynk server accepts: answered as standalone
        _try_send(sock, _refusal(login_bytes))
        raise SessionClosed("closed, the login's token is malformed")
    metrics.RELAY_FRAMES_FROM_DEVICES.inc(streams.device_frames)
    metrics.RELAY_BYTES_FROM_DEVICES.inc(len(login_bytes))
    return login, login_bytes, seen[1:]


def log_in_upstream(
    sock: socket.socket,
    streams: RelayStreams,
    upstream: Upstream,
    login_timeout: float,
    first: bytes = b"",
) -> tuple[Login, socket.socket, list]:
    """The login in a greenlet (a side speaks TLS): the accepted login, the
    upstream connection, and the events after the login in its segment.
    Raises SessionClosed (refused, unreachable, not a login) or TimeoutError;
    the upstream connection is closed then."""
    deadline = time.monotonic() + login_timeout
    login, login_bytes, seen = read_login(sock, streams, deadline, first)
    connection = upstream.connect()
    try:
        connection.settimeout(WRITE_TIMEOUT)
        connection.sendall(login_bytes)
        status = _answer(sock, connection, streams, login.msg_id, deadline)
    except BaseException:
        connection.close()
        raise
    if status != Status.OK:
        connection.close()
        metrics.LOGIN_FAILURES.labels("upstream_refused").inc()
        raise SessionClosed(f"closed, the upstream refused the login (status {status})")
    return login, connection, seen


class LoopLogin:
    """The login's exchange with the upstream on the event loop, for plain
    connections: a relayed login holds no greenlet while the upstream answers
    (in a reconnect storm, thousands of them would each hold a stack).

    Connect without waiting, pass the login on, pass the upstream's bytes to
    the device until the login is answered; then `answered(status)`, or
    `failed(error)` with SessionClosed (unreachable) or TimeoutError. The
    connect is bounded by relay.connect.timeout, the whole exchange by the
    login's deadline.
    """

    __slots__ = ("sock", "_session", "_login_bytes", "_msg_id", "_started", "_handles")

    def __init__(self, session: "LoginSide", login: Login, login_bytes: bytes, deadline: float):
        self._session = session
        self._login_bytes, self._msg_id = login_bytes, login.msg_id
        self._started = time.monotonic()
        self.sock = session.upstream.begin_connect()  # raises SessionClosed
        loop, fd = get_hub().loop, self.sock.fileno()
        connect_wait = min(session.upstream.connect_timeout, deadline - self._started)
        self._handles = {
            "connected": loop.io(fd, 2),  # writable: connected, or failed
            "readable": loop.io(fd, 1),
            "connect timeout": loop.timer(max(connect_wait, 0.0)),
            "deadline": loop.timer(max(deadline - self._started, 0.0)),
        }
        self._handles["connected"].start(self._connected)
        self._handles["connect timeout"].start(self._connect_timed_out)
        self._handles["deadline"].start(self._fail, TimeoutError())

    def _connected(self) -> None:
        self._handles["connected"].stop()
        self._handles["connect timeout"].stop()
        upstream = self._session.upstream
        error = upstream.outcome(self.sock)
        if error is not None:
            self._fail(upstream.unreachable(error))
            return
        upstream.connected(self.sock, self._started)
        try:
            taken = os.write(self.sock.fileno(), self._login_bytes)  # a login: one small segment
        except OSError as error:
            self._fail(SessionClosed(f"the upstream connection failed ({error})"))
            return
        if taken < len(self._login_bytes):
            self._fail(SessionClosed("the upstream did not take the login"))
            return
        self._handles["readable"].start(self._readable)

    def _connect_timed_out(self) -> None:
        self._fail(self._session.upstream.unreachable(TimeoutError("timed out")))

    def _readable(self) -> None:
        try:
            data = os.read(self.sock.fileno(), READ_BYTES)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail(SessionClosed(f"the upstream connection failed ({error})"))
            return
        if not data:
            self._fail(SessionClosed("closed, the upstream closed the connection unanswered"))
            return
        streams = self._session.streams
        before = streams.upstream_frames
        out, answers = streams.from_upstream(data)
        if out:
            metrics.RELAY_FRAMES_FROM_UPSTREAM.inc(streams.upstream_frames - before)
            metrics.RELAY_BYTES_FROM_UPSTREAM.inc(len(out))
            self._session.to_device(out)
        for answered, status in answers:
            if answered == self._msg_id:
                self.stop()
                get_hub().loop.run_callback(self.close)  # not inside a watcher's own callback
                if status != Status.OK:
                    metrics.LOGIN_FAILURES.labels("upstream_refused").inc()
                self._session.login_answered(status)
                return

    def _fail(self, error: BaseException) -> None:
        self.stop()
        get_hub().loop.run_callback(self.close)
        self._session.login_failed(error)

    def stop(self) -> None:
        """Watch no more (the socket is the session's, to keep or to close)."""
        for handle in self._handles.values():
            handle.stop()

    def close(self) -> None:
        """Free the watchers (outside their callbacks); again: nothing."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.close()


class LoginSide(Protocol):
    """What LoopLogin needs of its session (hardware/relay.py)."""

    upstream: Upstream
    streams: RelayStreams

    def to_device(self, data: bytes) -> None: ...

    def login_answered(self, status: int) -> None: ...

    def login_failed(self, error: BaseException) -> None: ...


def _answer(sock, connection, streams: RelayStreams, msg_id: int, deadline: float) -> int:
    """Pass the upstream's bytes to the device until it answers the login; its status."""
    while True:
        before = streams.upstream_frames
        out, answers = streams.from_upstream(_recv(connection, deadline))
        if out:
            sock.settimeout(WRITE_TIMEOUT)
            sock.sendall(out)
            metrics.RELAY_FRAMES_FROM_UPSTREAM.inc(streams.upstream_frames - before)
            metrics.RELAY_BYTES_FROM_UPSTREAM.inc(len(out))
        for answered, status in answers:
            if answered == msg_id:
                return status


def _recv(sock: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
    data = sock.recv(READ_BYTES)
    if not data:
        raise SessionClosed("disconnected")
    return data


def _try_send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        sock.settimeout(WRITE_TIMEOUT)
        sock.sendall(data)


def _refusal(login_bytes: bytes) -> bytes:
    """INVALID_TOKEN for a login frame, as the standalone server answers a malformed token."""
    msg_id = int.from_bytes(login_bytes[1:3], "big")
    return encode_response(msg_id, Status.INVALID_TOKEN) if msg_id else b""
