"""The device side: the shared port 8080 listener and one session per device."""

from ..http_handler import looks_like_http
from .relay import RelayedSession
from .server import HTTP_IDLE_TIMEOUT, SharedPortServer
from .session import DeviceSession
from .shedding import SHED
from .upstream import Upstream
from .wire import heartbeat_timeout

__all__ = [
    "HTTP_IDLE_TIMEOUT",
    "SharedPortServer",
    "looks_like_http",
    "DeviceSession",
    "RelayedSession",
    "Upstream",
    "SHED",
    "heartbeat_timeout",
]
