"""The device side: the shared port 8080 listener and one session per device."""

from .server import HTTP_IDLE_TIMEOUT, SharedPortServer, looks_like_http
from .session import SHED, DeviceSession, heartbeat_timeout
from .states import IllegalTransition, SessionState, SessionStateMachine

__all__ = [
    "HTTP_IDLE_TIMEOUT",
    "SharedPortServer",
    "looks_like_http",
    "DeviceSession",
    "SHED",
    "heartbeat_timeout",
    "IllegalTransition",
    "SessionState",
    "SessionStateMachine",
]
