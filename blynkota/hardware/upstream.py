"""The Blynk server blynkota relays to (relay mode): connecting to it, over TLS
if asked, and what is known of it (/readyz, the dashboard).

An upstream that cannot be reached closes the device's login unanswered (its
library tries again after a few seconds); the failures are counted by cause
and told in one line per UNREACHABLE_EVERY, however many devices met them.
"""

import contextlib
import errno
import logging
import os
import socket
import ssl
import time

from gevent import socket as gsocket

from .. import metrics
from ..logsafe import CountsPerInterval
from .wire import SessionClosed, no_delay

__all__ = ["UNREACHABLE", "Upstream"]

log = logging.getLogger(__name__)

RESOLVE_EVERY = 60.0  # seconds an upstream's name stays resolved
UNREACHABLE_EVERY = 10.0  # seconds between two lines about an upstream that cannot be reached


def _tell_unreachable(counts: dict[str, int]) -> None:
    causes = ", ".join(f"{cause}: {count}" for cause, count in counts.items())
    log.warning(
        "%d device login(s) in the last %g s closed unanswered: the upstream Blynk server "
        "could not be reached (%s); the devices try again",
        sum(counts.values()),
        UNREACHABLE_EVERY,
        causes,
    )


UNREACHABLE = CountsPerInterval(UNREACHABLE_EVERY, _tell_unreachable)


class Upstream:
    """The Blynk server the devices are relayed to, and the last word of it."""

    def __init__(self, host: str, port: int, ssl_setting: str, connect_timeout: float) -> None:
        self.host, self.port, self.connect_timeout = host, port, connect_timeout
        self.ssl_setting = ssl_setting
        self.context = None if ssl_setting == "false" else _client_context(ssl_setting)
        self._address: tuple[int, tuple] | None = None  # (family, address), from `_resolved`
        self._resolved_at = 0.0
        self.reachable: bool | None = None  # the last connection's outcome: /readyz, dashboard
        self.last_error = ""

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def state(self) -> dict:
        """What /readyz and the dashboard show of it."""
        return {
            "address": self.address,
            "tls": self.ssl_setting if self.ssl_setting in ("false", "true", "insecure") else "ca",
            "reachable": self.reachable,
            "last_error": self.last_error or None,
        }

    def connect(self) -> socket.socket:
        """A connection to the upstream, within relay.connect.timeout (TLS included)."""
        started = time.monotonic()
        sock = None
        try:
            sock = gsocket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
        except (OSError, ssl.SSLError) as error:
            if sock is not None:
                sock.close()
            raise self.unreachable(error) from None
        self.connected(sock, started)
        return sock

    def begin_connect(self) -> socket.socket:
        """A plain connection under way, without waiting: the event loop waits
        for it to be writable, then reads its outcome (`outcome`). The name is
        resolved here (cooperatively); raises SessionClosed if it cannot be."""
        try:
            family, address = self._resolved()
        except OSError as error:
            raise self.unreachable(error) from None
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise self.unreachable(OSError(code, os.strerror(code)))
        return sock

    def _resolved(self) -> tuple[int, tuple]:
        """The upstream's address: an IP address as it is, a name resolved at most
        once per RESOLVE_EVERY (in a reconnect storm, thousands of logins would
        otherwise queue for the resolver's threads)."""
        now = time.monotonic()
        if self._address is None or now - self._resolved_at >= RESOLVE_EVERY:
            family, _, _, _, address = gsocket.getaddrinfo(
                self.host, self.port, 0, socket.SOCK_STREAM
            )[0]
            self._address, self._resolved_at = (family, address), now
            if _is_address(self.host):
                self._resolved_at = float("inf")  # never again
        return self._address

    @staticmethod
    def outcome(sock: socket.socket) -> OSError | None:
        """The error of a connection begun by `begin_connect`, once writable."""
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            return None
        error_type = ConnectionRefusedError if code == errno.ECONNREFUSED else OSError
        return error_type(code, os.strerror(code))

    def connected(self, sock: socket.socket, started: float) -> None:
        """A connection made: counted, and its small frames sent at once."""
        self.reachable, self.last_error = True, ""
        metrics.RELAY_CONNECT_SECONDS.observe(time.monotonic() - started)
        with contextlib.suppress(OSError):
            no_delay(sock)

    def unreachable(self, error: BaseException) -> SessionClosed:
        """A connection that failed: counted by cause, told once per interval;
        what the device's session ends with."""
        cause = _cause(error)
        self.reachable, self.last_error = False, f"{cause} ({error})"
        metrics.RELAY_CONNECT_FAILURES.labels(cause).inc()
        UNREACHABLE.add(cause)
        return SessionClosed(f"closed unanswered, the upstream cannot be reached ({error})")


def _is_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            socket.inet_pton(family, host)
            return True
    return False


def _client_context(setting: str) -> ssl.SSLContext:
    if setting == "insecure":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=None if setting == "true" else setting)


def _cause(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ssl.SSLError):
        return "tls"
    return "network"
