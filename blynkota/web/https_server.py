"""The admin port's server: gevent's WSGIServer with a deadline on the TLS handshake.

gevent does the handshake in the connection's greenlet with no timeout, so a
client that opens TCP and never says hello holds one of the admin pool's
greenlets forever: a hundred of them locked the admin API out, and each one
that finally went away logged a traceback. Here the handshake has
TLS_HANDSHAKE_TIMEOUT seconds; a failed or late one is one info line, and an
established connection idle longer than ADMIN_IDLE_TIMEOUT is dropped.

Connections still in their handshake and established ones have budgets of
their own: up to HANDSHAKES of the first (a greenlet each, from the
listener's pool), up to REQUESTS of the second (a semaphore taken once the
handshake is done). So clients that connect and never speak TLS, however
many and however often, cost a greenlet each for at most the handshake's
deadline and never take the place of an admin whose session is established.

Devices over TLS (boards built with the library's `_SSL` headers) connect
here too, as the Blynk server shares 9443 between HTTPS and hardware: after
the handshake the first bytes tell an HTTP request from a Blynk login, and a
login goes to `device_handler` (the runner's: a device session with the
limits and deadlines of a plain one) in a greenlet of its own, out of the
handshakes' pool and the admins' budget.
"""

import io
import logging
import socket
from collections.abc import Callable
from contextlib import closing

import gevent
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from ..http_handler import SNIFF_BYTES, RequestHandler, looks_like_http

__all__ = [
    "ADMIN_IDLE_TIMEOUT",
    "AdminHttpsServer",
    "HANDSHAKES",
    "REQUESTS",
    "TLS_HANDSHAKE_TIMEOUT",
]

log = logging.getLogger("blynkota.https")

TLS_HANDSHAKE_TIMEOUT = 5.0  # seconds from the TCP accept to an established TLS session
ADMIN_IDLE_TIMEOUT = 60.0  # seconds an admin client may stay silent mid-request
HANDSHAKES = 1000  # connections between their accept and an established TLS session
REQUESTS = 100  # established admin connections served at once (more wait their turn)


class AdminHttpsServer(WSGIServer):
    handler_class = RequestHandler

    def __init__(
        self,
        *args,
        device_handler: Callable[[socket.socket, tuple, bytes], None] | None = None,
        sniff_timeout: float = TLS_HANDSHAKE_TIMEOUT,
        **kwargs,
    ) -> None:
        """`device_handler(secure socket, address, first bytes)` serves a device over
        TLS (None: this port is HTTPS only); `sniff_timeout` bounds its first bytes."""
        super().__init__(*args, spawn=Pool(HANDSHAKES), **kwargs)
        self._established = BoundedSemaphore(REQUESTS)
        self.device_handler = device_handler
        self.sniff_timeout = sniff_timeout

    def wrap_socket_and_handle(self, client_socket: socket.socket, address) -> None:
        client_socket.settimeout(TLS_HANDSHAKE_TIMEOUT)
        try:
            secure = self.wrap_socket(client_socket, **self.ssl_args)
        except OSError as error:  # ssl.SSLError and the timeout are OSErrors too
            log.info(
                "admin connection from %s: no TLS session (%s)", address[0], error or "timeout"
            )
            client_socket.close()
            return None
        first = b""
        if self.device_handler is not None:
            first = self._first_bytes(secure)
            if not first:
                secure.close()  # closed, or silent: nothing to answer
                return None
            if looks_like_http(first) is False:
                gevent.spawn(self.device_handler, secure, address, first)
                return None
        secure.settimeout(ADMIN_IDLE_TIMEOUT)
        with closing(secure), self._established:
            if not first:
                return self.handle(secure, address)
            # The bytes read to tell HTTP from a device come first in the request.
            rfile = io.BufferedReader(_ReadFirst(first, secure))
            return self.handler_class(secure, address, self, rfile).handle()

    def _first_bytes(self, secure) -> bytes:
        """Enough of the first bytes to tell HTTP from a device (b"" if none came)."""
        secure.settimeout(self.sniff_timeout)
        first = b""
        try:
            while looks_like_http(first) is None or not first:
                data = secure.recv(SNIFF_BYTES - len(first))
                if not data:
                    return b""
                first += data
        except OSError:  # the deadline (a TimeoutError), or a TLS error
            return b""
        return first


class _ReadFirst(io.RawIOBase):
    """A TLS connection read as a file, `first` (already read) before the rest."""

    def __init__(self, first: bytes, secure) -> None:
        self._first, self._secure = first, secure

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._first:
            count = min(len(buffer), len(self._first))
            buffer[:count] = self._first[:count]
            self._first = self._first[count:]
            return count
        return self._secure.recv_into(buffer)
