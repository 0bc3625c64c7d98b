"""Background work gives way to the devices before each of its statements.

A device process runs its clocks (heartbeat, presence, offer fill, rollout
sweep) on the event loop that also relays and answers its devices. PyMySQL
waits, and so lets the loop run, only when the database's answer has not
come yet; on a near database it mostly has. A clock's tick of a few
statements then ran as one stretch of Python, 2 to 7 ms with 5,000 relayed
devices a process (gevent's greenlet trace), and every frame that came in
meanwhile waited for its end: with the clocks slowed down instead, the
relay's added p99 at 10,000 devices was +1.0 ms against +2.3 ms, in one run
each (bench/relay.py, with the load of before 14e289d).

So a greenlet that runs background work marks itself (`in_background`), and
before each of its statements the event loop first handles the sockets that
are ready (`give_way`), without waiting for anything else: a tick is cut into
stretches of one statement each. Frames come first; the tick's own wait is a
few microseconds a statement when nothing else is ready.
"""

import contextvars

from gevent import get_hub
from sqlalchemy import Engine, event

__all__ = ["give_way", "give_way_before_statements", "in_background"]

_BACKGROUND = contextvars.ContextVar("background", default=False)

# libev's lowest priority: the timer, due at once, is handled after every
# socket that was ready in the same turn of the loop (at the default priority,
# it would be handled first, and the stretch would start before them).
_AFTER_THE_SOCKETS = -2


def in_background() -> None:
    """Mark the calling greenlet: its statements give way to the devices first.
    Each greenlet has a context of its own; one it spawns is not marked."""
    _BACKGROUND.set(True)


def give_way() -> None:
    """Let the event loop handle every socket ready now, then go on (no sleep:
    a timer due at once, polled without blocking)."""
    hub = get_hub()
    with hub.loop.timer(0.0, priority=_AFTER_THE_SOCKETS) as timer:
        hub.wait(timer)


def give_way_before_statements(engine: Engine) -> None:
    """Before each statement of a marked greenlet, the devices' turn."""

    @event.listens_for(engine, "before_cursor_execute")
    def _devices_first(*_statement) -> None:
        if _BACKGROUND.get():
            give_way()
