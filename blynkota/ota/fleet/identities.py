"""Who a token is, remembered for a while: a device that reconnects skips a query.

Shared-nothing, per process: an entry lives `ttl` seconds, so a device moved
to another project (import-blynk in another process) is seen within that
time, and a login whose presence write finds no row (the device is gone)
forgets its entry at once. Unknown tokens are never remembered: a device
added a moment ago must log in at its first try. The size is bounded; the
oldest entries go first.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["DeviceIdentity", "IdentityCache"]


@dataclass(frozen=True)
class DeviceIdentity:
    """Who a token is: the device, and the project and user it belongs to."""

    id: int
    token: str
    project_id: int
    user_id: int


class IdentityCache:
    def __init__(self, *, ttl: float = 60.0, size: int = 100_000) -> None:
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[str, tuple[float, DeviceIdentity]] = OrderedDict()

    def get(self, token: str) -> DeviceIdentity | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        expires, identity = entry
        if expires < time.monotonic():
            del self._entries[token]
            return None
        return identity

    def put(self, identity: DeviceIdentity) -> None:
        self._entries[identity.token] = (time.monotonic() + self.ttl, identity)
        self._entries.move_to_end(identity.token)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, token: str) -> None:
        self._entries.pop(token, None)
