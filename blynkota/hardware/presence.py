"""A logged-in connection's presence, the same for a standalone and a relayed session.

Registered in this process before the database hears of it: the connection
it replaces then finds itself unregistered and leaves the device online. The
presence row is written behind the login's answer (soft state); the
disconnect is written after the login and its report, never before them,
and only if the connection is still the device's (a newer login elsewhere
stays).
"""

from collections.abc import Callable

from .. import metrics
from ..ota import DeviceIdentity
from .wire import SessionClosed

__all__ = ["go_offline", "go_online"]


def go_online(link, identity: DeviceIdentity) -> None:
    """Make `link` (a session with `online`, `devices`, `address` and `since`)
    the device's connection: its `session_id`, and its `presence` write queued.
    Never waits. Raises SessionClosed if a newer connection holds the device."""
    registered, replaced = link.online.register(link)
    if not registered:
        metrics.LOGIN_FAILURES.labels("newer_connection").inc()
        raise SessionClosed("closed, the device has opened a newer connection")
    if replaced is not None:
        replaced.close("replaced by a new connection")
    link.session_id = link.devices.new_session_id()
    # Written behind: the write's outcome is read before the info message's report.
    link.presence = link.devices.device_online(identity, link.session_id, link.address, link.since)


def go_offline(link, then: Callable[[], None]) -> None:
    """The session is over: once its login and its report are written (at once,
    most of the time), it leaves the device, its disconnect is queued, and
    `then()` is called. Never waits: the event loop ends sessions too. A
    disconnect the database refuses is kept until it is back (nodes.py)."""
    for pending in (link.presence, link.report):
        # Their errors, if any, were the login's and the report's: told there.
        if pending is not None and not pending.ready():
            pending.rawlink(lambda _: go_offline(link, then))
            return
    if link.session_id is not None and link.online.unregister(link):
        link.devices.device_offline(link.device_id, link.session_id)
    then()
