"""Sans-IO codec for the Blynk hardware protocol.

`FrameReader` is fed whatever bytes arrived and hands back one event at a time,
or `NEED_DATA` when a frame is not complete yet: it never blocks and never
touches a socket, so every rule here is tested with bytes alone. The encoders
refuse to build a frame a v0.6.1 device would choke on (message id 0, a body
longer than the device's receive buffer).
"""

import re
import struct
from typing import Final

from .constants import (
    FIRST_RESERVED_COMMAND,
    HEADER_SIZE,
    HW_LOGIN,
    INTERNAL,
    KNOWN_UNHANDLED,
    LOGIN,
    OTA_MSG_ID,
    PING,
    RESPONSE,
    Command,
    Status,
)
from .events import Event, Ignored, Internal, Login, Ping, Response, Unknown

__all__ = [
    "FrameReader",
    "NEED_DATA",
    "ProtocolError",
    "RemoteProtocolError",
    "LocalProtocolError",
    "DEFAULT_MAX_BODY",
    "decode_frame",
    "encode_frame",
    "encode_response",
    "encode_login",
    "encode_ping",
    "encode_info",
    "encode_ota",
    "split_words",
]

_HEADER = struct.Struct("!BHH")

# Blynk tokens are 32 characters of [0-9a-zA-Z] (older servers: hex, newer:
# URL-safe base64). Anything else can never match a stored token.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The longest body we accept from a device. Info messages are ~120 bytes and
# the library's own send buffer is 1 KiB on newer builds; anything far past
# that is garbage or an attack, and must not make us buffer it.
DEFAULT_MAX_BODY: Final = 4096


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


class ProtocolError(Exception):
    """Base of the two codec errors."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol. `status`, when set, is owed to it before closing."""

    def __init__(self, message: str, *, msg_id: int = 0, status: int | None = None):
        super().__init__(message)
        self.msg_id = msg_id
        self.status = status


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids."""


def split_words(body: bytes) -> tuple[str, ...]:
    """NUL-separated words; one trailing NUL is a terminator, not an empty word."""
    if not body:
        return ()
    if body.endswith(b"\0"):
        body = body[:-1]
    return tuple(body.decode("utf-8", errors="replace").split("\0"))


class FrameReader:
    """Accumulates bytes and yields one event per complete frame."""

    __slots__ = ("_buffer", "_max_body")  # one per connected device: no dict each

    def __init__(self, max_body: int = DEFAULT_MAX_BODY) -> None:
        self._buffer = bytearray()
        self._max_body = max_body

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned event."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self) -> Event | _NeedData:
        if len(self._buffer) < HEADER_SIZE:
            return NEED_DATA
        command, msg_id, length = _HEADER.unpack_from(self._buffer)
        if command == RESPONSE:
            # The length field of a RESPONSE holds its status; there is no body.
            del self._buffer[:HEADER_SIZE]
            return Response(msg_id, length)
        if command >= FIRST_RESERVED_COMMAND:
            raise RemoteProtocolError(f"command type {command} is out of range")
        if length > self._max_body:
            raise RemoteProtocolError(
                f"frame body of {length} bytes exceeds the {self._max_body}-byte limit"
            )
        end = HEADER_SIZE + length
        if len(self._buffer) < end:
            return NEED_DATA
        body = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        return decode_frame(command, msg_id, body)


_LOGINS = frozenset((HW_LOGIN, LOGIN))


def decode_frame(command: int, msg_id: int, body: bytes) -> Event:
    """The event a whole frame (its header's command and id, its body) means."""
    if command in _LOGINS:
        return Login(msg_id, _decode_token(body, msg_id), command == LOGIN)
    if command == PING:
        return Ping(msg_id)
    if command == INTERNAL:
        return Internal(msg_id, split_words(body))
    if command in KNOWN_UNHANDLED:
        return Ignored(msg_id, command, body)
    return Unknown(msg_id, command)


def _decode_token(body: bytes, msg_id: int) -> str:
    # Old clients send `token\0`; the C++ library sends the bare token.
    raw = body.split(b"\0", 1)[0]
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError(
            "login token is not ASCII", msg_id=msg_id, status=Status.INVALID_TOKEN
        ) from None
    if not _TOKEN.fullmatch(token):
        raise RemoteProtocolError(
            "login token has illegal characters",
            msg_id=msg_id,
            status=Status.INVALID_TOKEN,
        )
    return token


def encode_frame(command: int, msg_id: int, body: bytes = b"") -> bytes:
    if not 0 < msg_id <= 0xFFFF:
        raise LocalProtocolError(f"message id {msg_id} is not in 1..65535")
    if len(body) > 0xFFFF:
        raise LocalProtocolError(f"body of {len(body)} bytes does not fit a frame")
    return _HEADER.pack(command, msg_id, len(body)) + body


def encode_response(msg_id: int, status: int = Status.OK) -> bytes:
    if not 0 < msg_id <= 0xFFFF:
        raise LocalProtocolError(f"message id {msg_id} is not in 1..65535")
    return _HEADER.pack(RESPONSE, msg_id, status)


def encode_login(token: str, msg_id: int = 1, *, legacy: bool = False) -> bytes:
    command = Command.LOGIN if legacy else Command.HW_LOGIN
    return encode_frame(command, msg_id, token.encode("ascii"))


def encode_ping(msg_id: int) -> bytes:
    return encode_frame(Command.PING, msg_id)


def encode_info(fields: dict[str, str], msg_id: int = 2) -> bytes:
    """The info message as the C++ library sends it: every word NUL-terminated."""
    body = b"".join(key.encode() + b"\0" + value.encode() + b"\0" for key, value in fields.items())
    return encode_frame(Command.INTERNAL, msg_id, body)


def encode_ota(url: str, *, buff_in: int) -> bytes:
    """The `ota` command; refuses a body the device could not receive."""
    body = b"ota\0" + url.encode("ascii")
    if len(body) > buff_in:  # the C++ library takes a body as long as its buffer
        raise LocalProtocolError(
            f"ota command of {len(body)} bytes does not fit the device's "
            f"{buff_in}-byte receive buffer"
        )
    return encode_frame(Command.INTERNAL, OTA_MSG_ID, body)
