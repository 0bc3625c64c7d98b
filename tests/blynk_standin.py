"""A Blynk server stand-in for the relay tests: the upstream blynkota relays to.

It checks tokens against a list, answers logins, pings and info messages as
the Blynk server does (200, or INVALID_TOKEN and close), records every byte
each device sent it, and sends frames of its own (HARDWARE, INTERNAL) on
demand. Plain threads and sockets: the test process blocks in its own
sockets, and the stand-in answers meanwhile.
"""

import contextlib
import socket
import ssl
import struct
import threading

HEADER = struct.Struct("!BHH")
RESPONSE, LOGIN, PING, INTERNAL, HW_LOGIN = 0, 2, 6, 17, 29


class BlynkStandIn:
    def __init__(self, tokens: set[str], tls: ssl.SSLContext | None = None) -> None:
        self.tokens = set(tokens)
        self.tls = tls  # a server context: the devices' connections arrive over TLS
        self.received: dict[str, bytearray] = {}  # token -> every byte its device sent here
        self.sessions: dict[str, list[bytearray]] = {}  # token -> those bytes, by connection
        self.connections: dict[str, socket.socket] = {}
        self.logins: list[tuple[str, int]] = []  # (token, status answered)
        self.ended: set[str] = set()  # tokens whose connection here has ended
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self.port = 0

    def start(self, port: int = 0) -> "BlynkStandIn":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(2048)
        self._listener, self.port = listener, listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and close every connection (a crash, as the devices see it)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept()
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
            self.connections.clear()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def send(self, token: str, frame: bytes) -> None:
        """A frame of the server's own to a logged-in device (HARDWARE, INTERNAL, ...)."""
        self.connections[token].sendall(frame)

    def bytes_from(self, token: str) -> bytes:
        with self._lock:
            return bytes(self.received.get(token, b""))

    def sessions_of(self, token: str) -> list[bytes]:
        """What the device sent on each of its connections here, oldest first."""
        with self._lock:
            return [bytes(received) for received in self.sessions.get(token, [])]

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        buffer, token, mine = b"", None, bytearray()
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                if token is not None:
                    with self._lock:
                        mine += data
                buffer += data
                while len(buffer) >= 5:
                    command, msg_id, length = HEADER.unpack_from(buffer)
                    size = 5 if command == RESPONSE else 5 + length
                    if len(buffer) < size:
                        break
                    body, buffer = buffer[5:size], buffer[size:]
                    if token is None:
                        token = self._log_in(sock, command, msg_id, body, data)
                        if token is None:
                            return
                        with self._lock:
                            mine = self.received[token]  # this connection's, not a later one's
                            mine += buffer  # what came after the login in the same segment
                    elif command in (PING, INTERNAL):
                        sock.sendall(HEADER.pack(RESPONSE, msg_id, 200))
        except OSError:
            return
        finally:
            sock.close()
            if token is not None:
                with self._lock:
                    self.ended.add(token)

    def _log_in(self, sock, command: int, msg_id: int, body: bytes, data: bytes) -> str | None:
        token = body.split(b"\0", 1)[0].decode("ascii", "replace")
        accepted = command in (LOGIN, HW_LOGIN) and token in self.tokens
        status = 200 if accepted else 9
        with self._lock:
            self.logins.append((token, status))
        sock.sendall(HEADER.pack(RESPONSE, msg_id, status))
        if not accepted:
            return None
        with self._lock:
            self.received[token] = bytearray(HEADER.pack(command, msg_id, len(body)) + body)
            self.sessions.setdefault(token, []).append(self.received[token])
            self.connections[token] = sock
        return token
