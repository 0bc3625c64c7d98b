"""The device side: the shared port 8080 listener and one session per device."""

from .server import HTTP_IDLE_TIMEOUT, SharedPortServer, looks_like_http
from .session import DeviceSession
from .shedding import SHED
from .wire import heartbeat_timeout

__all__ = [
    "HTTP_IDLE_TIMEOUT",
    "SharedPortServer",
    "looks_like_http",
    "DeviceSession",
    "SHED",
    "heartbeat_timeout",
]
