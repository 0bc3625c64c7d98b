"""Port 8080: devices and plain HTTP on one listener, as on the Blynk server.

Each connection is sniffed with MSG_PEEK (nothing is consumed): an HTTP method
word hands it to the WSGI handler untouched, anything else is a device. The
server is a gevent WSGIServer (itself a StreamServer) whose connections are
spawned from a bounded pool. A device session that parks (hardware/loop_watch.py)
keeps its connection when its handler returns: the session closes it, and
it still counts against hardware.max.connections until then.
"""

import errno
import logging
import os
import socket
import time
from collections.abc import Callable

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from ..http_handler import HTTP_IDLE_TIMEOUT, SNIFF_BYTES, RequestHandler, looks_like_http
from ..peeking import peek_waits

__all__ = ["HTTP_IDLE_TIMEOUT", "SharedPortServer"]

log = logging.getLogger(__name__)

# Connections not sniffed yet get a share of the pool of their own, beyond
# hardware.max.connections and http.max.connections.
SNIFF_RESERVE = 256
WARN_EVERY = 10.0  # seconds between two warnings of one overload
ACCEPT_PAUSE = 0.5  # seconds without accepting once the process is out of file descriptors
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class SharedPortServer(WSGIServer):
    handler_class = RequestHandler

    def __init__(
        self,
        listener,
        application,
        device_handler,
        *,
        sniff_timeout,
        max_connections,
        max_http_connections,
        file_sender: Callable[[socket.socket, tuple], bool] | None = None,
        device_starter: Callable[[socket.socket, tuple, Callable[[], None]], None] | None = None,
    ):
        super().__init__(
            listener,
            application,
            # Devices and HTTP clients have a limit each, so neither a full
            # house of devices nor a crowd of slow HTTP clients locks the
            # other out (the devices' own updates download over HTTP).
            spawn=Pool(max_connections + max_http_connections + SNIFF_RESERVE),
            log=logging.getLogger("blynkota.http"),
            error_log=logging.getLogger("blynkota.http"),
            environ={"SERVER_NAME": "blynkota"},
        )
        self.device_handler = device_handler
        # Starts a device's session from the event loop; it owns the connection.
        self.device_starter = device_starter
        self.sniff_timeout = sniff_timeout
        # Answers firmware requests itself; False hands the rest to WSGI, unread.
        self.file_sender = file_sender
        self.max_devices = max_connections
        self.devices = 0  # device sessions open now, parked ones included
        self._kept: set = set()  # sockets of sessions that parked, until do_close
        self.max_http = max_http_connections
        self.http_clients = 0  # HTTP connections open now
        self._warned: dict[str, float] = {}  # a warning's key -> when it was last logged

    def do_read(self):
        """Accept one connection; out of file descriptors, pause instead of spinning.

        gevent would log a traceback for every refused accept; a storm of
        devices meeting the process's open-files limit is an expected load,
        answered by waiting (the kernel keeps them in the listen backlog).
        """
        try:
            return super().do_read()
        except OSError as error:
            if error.errno not in _OUT_OF_DESCRIPTORS:
                raise
            reason = os.strerror(error.errno)
        self._warn_now_and_then(
            "descriptors",
            "out of file descriptors (%s): accepting again in %.1fs; raise the open-files "
            "limit (ulimit -n) or lower hardware.max.connections",
            reason,
            ACCEPT_PAUSE,
        )
        self.stop_accepting()
        gevent.spawn_later(ACCEPT_PAUSE, self._accept_again)
        return None

    def do_handle(self, sock, address):
        """From the accept loop. A device whose first bytes are already here
        starts in the loop, without a greenlet (`device_starter`): a storm's
        devices nearly all have sent their login by the time the loop accepts
        them, and a greenlet each would cost more than the login. Everything
        else gets a greenlet from the pool, which sniffs and waits as it must."""
        if self.device_starter is not None and self.devices < self.max_devices:
            try:
                sock.settimeout(0.0)  # a peek that never waits: the loop runs this
                first = sock.recv(SNIFF_BYTES, socket.MSG_PEEK)
            except OSError:  # nothing yet (or reset): the greenlet finds out
                first = b""
            if first and looks_like_http(first) is False:
                self.devices += 1
                try:
                    self.device_starter(sock, address, self._device_ended)
                except Exception:
                    log.exception("connection %s:%s: no device session", *address[:2])
                    self.devices -= 1
                    sock.close()
                return
        super().do_handle(sock, address)

    def _warn_now_and_then(self, key: str, message: str, *args) -> None:
        """One line per WARN_EVERY seconds for a condition met at every connection."""
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY) >= WARN_EVERY:
            self._warned[key] = now
            log.warning(message, *args)

    def _accept_again(self) -> None:
        if self.started:
            self.start_accepting()

    def handle(self, sock, address):
        kept = False  # a parked device session owns its socket from now on
        try:
            kind = self._sniff(sock)
            if kind is True:
                self._serve_http(sock, address)
            elif kind is False:
                kept = self.serve_device(sock, address)
        except OSError as error:
            log.info("connection %s:%s lost before it said anything (%s)", *address[:2], error)
        finally:
            if kept:
                self._kept.add(sock)
            else:
                sock.close()

    def do_close(self, sock, *args):
        """After `handle`: close the connection unless a parked session owns it."""
        if sock in self._kept:
            self._kept.discard(sock)
        else:
            sock.close()

    def _serve_http(self, sock, address) -> None:
        if self.http_clients >= self.max_http:
            self._warn_now_and_then(
                "http full",
                "%d HTTP connections open (http.max.connections): closing new ones",
                self.http_clients,
            )
            return  # closed by handle()
        self.http_clients += 1
        try:
            if self.file_sender is None or not self.file_sender(sock, address):
                super().handle(sock, address)
        finally:
            self.http_clients -= 1

    def serve_device(self, sock, address, *first: bytes) -> bool:
        """Run the device's session, counted against hardware.max.connections; True
        if it parked, keeping the connection. `first`: bytes already read from it
        (a device over TLS on the HTTPS port)."""
        if self.devices >= self.max_devices:
            self._warn_now_and_then(
                "full",
                "%d devices connected (hardware.max.connections): closing new ones, "
                "which come back later",
                self.devices,
            )
            return False  # closed by handle(): the device's library tries again
        self.devices += 1
        kept = False
        try:
            kept = self.device_handler(sock, address, self._device_ended, *first)
        finally:
            if not kept:
                self.devices -= 1
        return kept

    def _device_ended(self) -> None:
        """A parked session is over (its handler returned long ago)."""
        self.devices -= 1

    def _sniff(self, sock) -> bool | None:
        deadline = time.monotonic() + self.sniff_timeout
        waits = peek_waits()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(remaining)
            try:
                first = sock.recv(SNIFF_BYTES, socket.MSG_PEEK)
            except TimeoutError:
                return None
            if not first:
                return None
            kind = looks_like_http(first)
            if kind is not None:
                if kind:  # a device session sets the timeout of each of its reads
                    sock.settimeout(HTTP_IDLE_TIMEOUT)
                return kind
            gevent.sleep(next(waits))  # a prefix of a method word: wait for the rest
