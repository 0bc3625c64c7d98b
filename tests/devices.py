"""A raw device connection for protocol tests: blocking socket, exact bytes."""

import socket
import time

from blynkota.protocol import NEED_DATA, FrameReader, encode_info, encode_login

TOKEN = "0123456789abcdef0123456789abcdef"
BUILD_OLD = "Jan  1 2018 00:00:00"
BUILD_NEW = "Nov 29 2018 12:00:00"


class RawDevice:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self._attach(socket.create_connection((host, port), timeout=10))

    @classmethod
    def over(cls, connection: socket.socket) -> "RawDevice":
        """A device on a connection made elsewhere (its login perhaps sent already)."""
        device = cls.__new__(cls)
        device._attach(connection)
        return device

    def _attach(self, connection: socket.socket) -> None:
        self.sock = connection
        self.reader = FrameReader(max_body=65535)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def event(self, timeout: float = 5.0):
        """The next frame from the server, or None when it closed the connection."""
        self.sock.settimeout(timeout)
        while (event := self.reader.next_event()) is NEED_DATA:
            data = self.sock.recv(4096)
            if not data:
                return None
            self.reader.feed(data)
        return event

    def closed_within(self, seconds: float) -> bool:
        """True if the server closes the connection within `seconds` (frames are skipped)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
        return False

    def log_in(self, token: str = TOKEN, build: str | None = BUILD_OLD, **info: str):
        self.send(encode_login(token, 1))
        login_answer = self.event()
        fields = {"ver": "0.6.1", "h-beat": "10", "buff-in": "256", "dev": "ESP8266", **info}
        if build is not None:
            fields["build"] = build
        self.send(encode_info(fields, 2))
        return login_answer, self.event()

    def close(self) -> None:
        self.sock.close()


def without_key(url: str) -> str:
    """An `ota` URL without its per-offer key (`?o=...`): the served path."""
    base, _, query = url.partition("?")
    assert query == "" or (query.startswith("o=") and 0 < len(query) - 2 <= 16), url
    return base
