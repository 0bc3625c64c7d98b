"""The Blynk server blynkota relays to (relay mode): connecting to it, over TLS
if asked, and what is known of it (/readyz, the dashboard).

An upstream that cannot be reached closes the device's login unanswered (its
library tries again after a few seconds); the failures are counted by cause
and told in one line per UNREACHABLE_EVERY, however many devices met them.
"""

import contextlib
import logging
import socket
import ssl
import time

from gevent import socket as gsocket

from .. import metrics
from ..logsafe import CountsPerInterval
from .wire import SessionClosed

__all__ = ["UNREACHABLE", "Upstream"]

log = logging.getLogger(__name__)

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
            cause = _cause(error)
            self.reachable, self.last_error = False, f"{cause} ({error})"
            metrics.RELAY_CONNECT_FAILURES.labels(cause).inc()
            UNREACHABLE.add(cause)
            raise SessionClosed(
                f"closed unanswered, the upstream cannot be reached ({error})"
            ) from None
        self.reachable, self.last_error = True, ""
        metrics.RELAY_CONNECT_SECONDS.observe(time.monotonic() - started)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


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
