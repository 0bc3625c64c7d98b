"""A relayed device's login: the upstream Blynk server decides it.

The device's first frame must be a login (LOGIN or HW_LOGIN), as on any
Blynk server. Blynkota opens the upstream connection, passes the login on as
it came, and passes the upstream's bytes back until the login is answered:
200 makes a relayed session; any other answer has reached the device, and
both sides close. The whole exchange is bounded by the login timeout.
"""

import contextlib
import socket
import time

from .. import metrics
from ..protocol import Command, Login, Status, encode_response
from ..protocol.relay import RelayStreams
from .upstream import Upstream
from .wire import READ_BYTES, WRITE_TIMEOUT, SessionClosed

__all__ = ["log_in_upstream"]


def log_in_upstream(
    sock: socket.socket,
    streams: RelayStreams,
    upstream: Upstream,
    login_timeout: float,
    first: bytes = b"",
) -> tuple[Login, socket.socket, list]:
    """The accepted login, the upstream connection, and the events that came
    after the login in its segment (an info message, say). `first`: bytes
    already read from the device's connection (a TLS one's). Raises SessionClosed
    (refused, unreachable, not a login) or TimeoutError; the upstream
    connection is closed then."""
    deadline = time.monotonic() + login_timeout
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
    connection = upstream.connect()
    try:
        connection.settimeout(WRITE_TIMEOUT)
        connection.sendall(login_bytes)
        metrics.RELAY_FRAMES_FROM_DEVICES.inc(streams.device_frames)
        metrics.RELAY_BYTES_FROM_DEVICES.inc(len(login_bytes))
        status = _answer(sock, connection, streams, login.msg_id, deadline)
    except BaseException:
        connection.close()
        raise
    if status != Status.OK:
        connection.close()
        metrics.LOGIN_FAILURES.labels("upstream_refused").inc()
        raise SessionClosed(f"closed, the upstream refused the login (status {status})")
    return login, connection, seen[1:]


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
