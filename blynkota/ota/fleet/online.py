"""The devices connected right now, by token.

The hardware server registers one link per logged-in connection of this
process; the OTA service writes `ota` frames through it without knowing about
sockets. A second connection with the same token replaces the first, as on the
Blynk server. Which node holds a device is in the database (cluster/nodes.py):
this registry only reaches the devices of this process.
"""

from typing import Protocol

__all__ = [
    "DeviceLink",
    "FrameTooLarge",
    "NoDownloadSlot",
    "OfferDeferred",
    "OfferFailed",
    "OnlineDevices",
]


class OfferFailed(Exception):
    """The `ota` command could not be written to the device; the message says why."""


class FrameTooLarge(OfferFailed):
    """The `ota` frame does not fit the device's receive buffer: it never will."""


class OfferDeferred(OfferFailed):
    """Not now (rollout paused, no download slot): the device stays pending."""


class NoDownloadSlot(OfferDeferred):
    """Every download slot (ota.max.concurrent) is taken."""


class DeviceLink(Protocol):
    token: str
    tag: str  # what the log shows of the token (logsafe.token_tag)
    serial: int  # connection order: a later connection has a larger serial
    device_id: int | None
    session_id: int | None  # as recorded in the device's presence row

    @property
    def ready(self) -> bool:
        """True once the device's info message is answered: `ota` may be written."""

    def ota_frame(self, path: str) -> tuple[str, bytes]:
        """The full URL and the `ota` frame for `path`. Raises OfferFailed if it cannot fit."""

    def write_frame(self, frame: bytes) -> None:
        """Write a frame to the device. Raises OfferFailed when the connection fails."""

    def close(self, reason: str, *, quiet: bool = False) -> None:
        """Close the connection; `quiet` logs it at DEBUG (one of many, summed up by the caller)."""


class OnlineDevices:
    def __init__(self) -> None:
        self._links: dict[str, DeviceLink] = {}

    def __len__(self) -> int:
        return len(self._links)

    def get(self, token: str) -> DeviceLink | None:
        return self._links.get(token)

    def links(self) -> list[DeviceLink]:
        return list(self._links.values())

    def get_ready(self, token: str) -> DeviceLink | None:
        link = self._links.get(token)
        return link if link is not None and link.ready else None

    def register(self, link: DeviceLink) -> tuple[bool, DeviceLink | None]:
        """Make `link` the device's connection unless a newer one already is.

        Returns (registered, the link it replaces). A login that took long (a
        slow database in a reconnect storm) must not push out the connection
        the device opened after giving up on it.
        """
        previous = self._links.get(link.token)
        if previous is not None and previous is not link and previous.serial > link.serial:
            return False, None
        self._links[link.token] = link
        return True, previous if previous is not link else None

    def unregister(self, link: DeviceLink) -> bool:
        """Forget `link` if it is still the device's connection; True if it was."""
        if self._links.get(link.token) is link:
            del self._links[link.token]
            return True
        return False
