"""The Blynk hardware protocol as bytes in, events out (no sockets here)."""

from .codec import (
    DEFAULT_MAX_BODY,
    NEED_DATA,
    FrameReader,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    encode_frame,
    encode_info,
    encode_login,
    encode_ota,
    encode_ping,
    encode_response,
    split_words,
)
from .constants import HEADER_SIZE, OTA_MSG_ID, Command, Status
from .events import INFO_KEYS, Event, Ignored, Internal, Login, Ping, Response, Unknown

__all__ = [
    "DEFAULT_MAX_BODY",
    "NEED_DATA",
    "FrameReader",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "encode_frame",
    "encode_info",
    "encode_login",
    "encode_ota",
    "encode_ping",
    "encode_response",
    "split_words",
    "HEADER_SIZE",
    "OTA_MSG_ID",
    "Command",
    "Status",
    "INFO_KEYS",
    "Event",
    "Ignored",
    "Internal",
    "Login",
    "Ping",
    "Response",
    "Unknown",
]
