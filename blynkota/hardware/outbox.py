"""Bytes for one side of a relayed session, written without ever waiting.

The event loop relays (hardware/relay.py): a write there must not wait. What
the kernel takes at once is gone; the rest waits here, and a write watcher
sends it as the side reads. Past OUTPUT_LIMIT the relay stops reading the
other side until this one has caught up, so a side that reads slowly holds
bounded memory and slows its peer, as TCP would between them.

A TLS connection's records go through the ssl module, which may wait: its
bytes are written by a greenlet of its own (`TlsOutbox`).
"""

import os
import socket
import ssl
from collections.abc import Callable

import gevent
from gevent import get_hub
from gevent.event import Event

from .wire import READ_BYTES, WRITE_TIMEOUT

__all__ = ["OUTPUT_LIMIT", "Outbox", "TlsOutbox", "read_tls"]

OUTPUT_LIMIT = 256 * 1024  # bytes queued for one side before reads from the other pause


class Outbox:
    __slots__ = ("sock", "fd", "pending", "_watcher", "_failed", "_drained")

    def __init__(
        self,
        sock: socket.socket,
        failed: Callable[[str], None],
        drained: Callable[[], None],
    ) -> None:
        """`failed(reason)` when the connection fails; `drained()` when what waited is sent."""
        self.sock, self.fd = sock, sock.fileno()  # the number: read on every frame
        self.pending = bytearray()
        self._watcher = None  # made the first time the kernel does not take it all
        self._failed, self._drained = failed, drained

    @property
    def full(self) -> bool:
        """Past OUTPUT_LIMIT: the other side's reads should pause."""
        return len(self.pending) > OUTPUT_LIMIT

    def send(self, data: bytes) -> None:
        if self.pending:
            self.pending += data
            return
        try:  # `_write`, inline: this runs for every frame relayed
            taken = os.write(self.fd, data)
        except BlockingIOError:
            taken = 0
        except OSError as error:
            self._failed(f"connection failed ({error})")
            return
        if taken < len(data):
            self.pending += data[taken:]
            if self._watcher is None:  # most connections never need one: memory
                self._watcher = get_hub().loop.io(self.fd, 2)  # 2: writable
            self._watcher.start(self._writable)

    def _write(self, data: bytes) -> int | None:
        """Bytes the kernel took; None if the connection failed."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError as error:
            self._failed(f"connection failed ({error})")
            return None

    def _writable(self) -> None:
        taken = self._write(bytes(self.pending))
        if taken is None:
            return
        del self.pending[:taken]
        if not self.pending:
            self._watcher.stop()
            self._drained()

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()


class TlsOutbox:
    """The same for a TLS connection: a greenlet writes its records."""

    __slots__ = ("sock", "pending", "_wake", "_writer", "_failed", "_drained")

    def __init__(
        self,
        sock: ssl.SSLSocket,
        failed: Callable[[str], None],
        drained: Callable[[], None],
    ) -> None:
        self.sock = sock
        self.pending = bytearray()
        self._wake = Event()
        self._failed, self._drained = failed, drained
        self._writer = gevent.spawn(self._write_all)

    @property
    def full(self) -> bool:
        return len(self.pending) > OUTPUT_LIMIT

    def send(self, data: bytes) -> None:
        self.pending += data
        self._wake.set()

    def _write_all(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self.pending:
                data = bytes(self.pending)
                self.pending.clear()
                try:
                    self.sock.settimeout(WRITE_TIMEOUT)
                    self.sock.sendall(data)
                except (OSError, ssl.SSLError) as error:
                    self._failed(f"connection failed ({error})")
                    return
            self._drained()

    def stop(self) -> None:
        if self._writer is not gevent.getcurrent():
            self._writer.kill(block=False)

    def close(self) -> None:
        self.stop()


def read_tls(
    sock: ssl.SSLSocket, received: Callable[[bytes], None], failed: Callable[[str], None]
) -> gevent.Greenlet:
    """A TLS connection's reads, in a greenlet: each to `received`, b"" (its end)
    included; `failed(reason)` when the connection fails."""

    def read_all() -> None:
        sock.settimeout(None)
        while True:
            try:
                data = sock.recv(READ_BYTES)
            except (OSError, ssl.SSLError) as error:
                failed(f"connection failed ({error})")
                return
            received(data)
            if not data:
                return

    return gevent.spawn(read_all)
