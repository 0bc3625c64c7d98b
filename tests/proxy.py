"""A TCP forwarder the tests can cut: a database that goes away and comes back.

Threads and blocking sockets, so it keeps forwarding while a test blocks on a
device socket. `cut()` closes every connection and refuses new ones (the
database server is down); `restore()` listens on the same port again.
`hang()` holds every byte where it is, connections left open (the network
drops packets, or the server is stopped with SIGSTOP); `flow()` lets them
through again. `slow(seconds)` holds every chunk that long before passing
it on (a database far away, or overloaded). `shut_down()` is MariaDB
stopping: no new connections, and the next command on an open one is
answered with error 1053 ("Server shutdown in progress") before the
connection closes; `restore()` ends it.
"""

import contextlib
import socket
import struct
import threading
import time

__all__ = ["CuttableProxy"]

_SHUTTING_DOWN = b"Server shutdown in progress"
# The MySQL protocol's ERR packet answering a command (sequence id 1): 0xFF,
# the code, '#' and the SQL state, the message.
_ERR_1053 = b"\xff" + struct.pack("<H", 1053) + b"#08S01" + _SHUTTING_DOWN
_ERR_1053_PACKET = struct.pack("<I", len(_ERR_1053))[:3] + b"\x01" + _ERR_1053


class CuttableProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._shutting_down = False
        self._delay = 0.0
        self._clients: set[socket.socket] = set()

    def start(self) -> "CuttableProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
                self._clients.add(client)
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self._delay:
                    time.sleep(self._delay)
                self._flowing.wait()
                if self._shutting_down and source in self._clients:
                    source.sendall(_ERR_1053_PACKET)
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone does not.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            open_sockets, self._open = self._open, set()
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def shut_down(self) -> None:
        self._shutting_down = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None

    def slow(self, seconds: float) -> None:
        self._delay = seconds

    def hang(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def restore(self) -> None:
        self._shutting_down = False
        self.start()

    def stop(self) -> None:
        self.flow()
        self.cut()
