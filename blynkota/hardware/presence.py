"""A logged-in connection's presence, the same for a standalone and a relayed session.

Registered in this process before the database hears of it: the connection
it replaces then finds itself unregistered and leaves the device online. The
presence row is written behind the login's answer (soft state); the
disconnect is written after the login and its report, never before them,
and only if the connection is still the device's (a newer login elsewhere
stays).
"""

import logging
from collections.abc import Callable

from .. import metrics
from ..ota import DeviceIdentity
from .shedding import DATABASE_ERRORS
from .wire import SessionClosed

__all__ = ["go_offline", "go_offline_later", "go_online"]

log = logging.getLogger("blynkota.hardware.session")


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


def go_offline(link) -> bool:
    """The session is over: its disconnect written, once the login and the report
    are. True if it was still the device's connection here."""
    if link.presence is not None:
        link.presence.wait()  # its error, if any, is the login's: told there
    if link.report is not None:
        link.report.wait()
    if link.session_id is None or not link.online.unregister(link):
        return False
    try:
        link.devices.device_offline(link.device_id, link.session_id)
    except DATABASE_ERRORS:
        log.debug("device %s: disconnect kept until the database is back", link.tag)
    return True


def go_offline_later(link, then: Callable[[], None]) -> None:
    """`go_offline` without waiting, for the event loop: once the login and the
    report are written (at once, most of the time), the disconnect is queued,
    and `then()` is called. A disconnect the database refuses is kept (nodes.py)."""
    for pending in (link.presence, link.report):
        if pending is not None and not pending.ready():
            pending.rawlink(lambda _: go_offline_later(link, then))
            return
    if link.session_id is not None and link.online.unregister(link):
        link.devices.device_offline_later(link.device_id, link.session_id)
    then()
