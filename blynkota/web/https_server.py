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
"""

import logging
import socket
from contextlib import closing

from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from ..http_handler import RequestHandler

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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, spawn=Pool(HANDSHAKES), **kwargs)
        self._established = BoundedSemaphore(REQUESTS)

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
        secure.settimeout(ADMIN_IDLE_TIMEOUT)
        with closing(secure), self._established:
            return self.handle(secure, address)
