"""The admin port's server: gevent's WSGIServer with a deadline on the TLS handshake.

gevent does the handshake in the connection's greenlet with no timeout, so a
client that opens TCP and never says hello holds one of the admin pool's
greenlets forever: a hundred of them locked the admin API out, and each one
that finally went away logged a traceback. Here the handshake has
TLS_HANDSHAKE_TIMEOUT seconds; a failed or late one is one info line, and an
established connection idle longer than ADMIN_IDLE_TIMEOUT is dropped.
"""

import logging
import socket
from contextlib import closing

from gevent.pywsgi import WSGIServer

from ..http_handler import RequestHandler

__all__ = ["ADMIN_IDLE_TIMEOUT", "AdminHttpsServer", "TLS_HANDSHAKE_TIMEOUT"]

log = logging.getLogger("blynkota.https")

TLS_HANDSHAKE_TIMEOUT = 5.0  # seconds from the TCP accept to an established TLS session
ADMIN_IDLE_TIMEOUT = 60.0  # seconds an admin client may stay silent mid-request


class AdminHttpsServer(WSGIServer):
    handler_class = RequestHandler

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
        with closing(secure):
            return self.handle(secure, address)
