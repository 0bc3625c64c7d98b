"""A device's conversation with the server: its states, and what each frame
gets in each state, in one place (as h11's _state.py). No sockets here.

A session asks `reaction_to(state, event)` for every frame, whether a
greenlet reads it or the event loop does for a parked session
(hardware/session.py): the loop adds only "can this run without waiting",
so a rule changed here changes both.
"""

from dataclasses import dataclass
from enum import Enum

from .constants import Status
from .events import Ignored, Internal, Login, Ping, Response, Unknown

__all__ = [
    "ALREADY_REGISTERED",
    "IGNORE",
    "ILLEGAL_COMMAND",
    "INFO",
    "LOG_IN",
    "MAX_EXTRA_LOGINS",
    "NOT_A_LOGIN",
    "PONG",
    "IllegalTransition",
    "Reaction",
    "SessionState",
    "SessionStateMachine",
    "reaction_to",
]


class SessionState(Enum):
    AWAITING_LOGIN = "awaiting login"  # connected, nothing valid received yet
    LOGGED_IN = "logged in"  # token accepted; info message not yet answered
    READY = "ready"  # info answered: `ota` commands may be written now
    CLOSED = "closed"

    # Members are singletons compared by identity: hash them as objects, in
    # C, rather than by Enum's Python-level hash of the name (every
    # transition and state check of every login hashes one).
    __hash__ = object.__hash__


_TRANSITIONS: dict[tuple[SessionState, str], SessionState] = {
    (SessionState.AWAITING_LOGIN, "login accepted"): SessionState.LOGGED_IN,
    (SessionState.LOGGED_IN, "info answered"): SessionState.READY,
    (SessionState.READY, "info answered"): SessionState.READY,
    (SessionState.AWAITING_LOGIN, "close"): SessionState.CLOSED,
    (SessionState.LOGGED_IN, "close"): SessionState.CLOSED,
    (SessionState.READY, "close"): SessionState.CLOSED,
    (SessionState.CLOSED, "close"): SessionState.CLOSED,
}


class IllegalTransition(RuntimeError):
    pass


class SessionStateMachine:
    """A transition not in the table is a bug in the session code, and raises."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = SessionState.AWAITING_LOGIN

    def advance(self, event: str) -> SessionState:
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(f"{event!r} in state {self.state.value!r}") from None
        return self.state


@dataclass(frozen=True, eq=False)
class Reaction:
    """What a frame gets: the status answered to it (None: no answer of its own),
    whether the session ends after it, and whether the event loop may give it
    (False: a greenlet does, it may wait)."""

    name: str
    reply: int | None = None
    closes: bool = False
    in_loop: bool = True


# Before login, only a login is read; anything else ends the connection, unanswered.
LOG_IN = Reaction("log in", in_loop=False)
NOT_A_LOGIN = Reaction("not a login", closes=True, in_loop=False)
# Logged in.
PONG = Reaction("ping", reply=Status.OK)
# Answered OK once nothing durable can come before the login's write, then recorded.
INFO = Reaction("info message", reply=Status.OK)
# The Blynk server's answer to a second login; past MAX_EXTRA_LOGINS, a flood: closed.
ALREADY_REGISTERED = Reaction("second login", reply=Status.ALREADY_REGISTERED, in_loop=False)
ILLEGAL_COMMAND = Reaction(
    "unknown command", reply=Status.ILLEGAL_COMMAND, closes=True, in_loop=False
)
# Known, not needed for OTA: the Blynk server ignores them too.
IGNORE = Reaction("ignored")

MAX_EXTRA_LOGINS = 3  # ALREADY_REGISTERED answers before a login flood is closed


def reaction_to(state: SessionState, event) -> Reaction:
    """What `event` (protocol/events.py) gets from a session in `state`."""
    if state is SessionState.AWAITING_LOGIN:
        return LOG_IN if isinstance(event, Login) else NOT_A_LOGIN
    if isinstance(event, Ping):
        return PONG
    if isinstance(event, Internal):
        return INFO if event.is_info else IGNORE
    if isinstance(event, Login):
        return ALREADY_REGISTERED
    if isinstance(event, Unknown):
        return ILLEGAL_COMMAND
    if isinstance(event, (Ignored, Response)):
        return IGNORE
    raise TypeError(f"not a device event: {event!r}")
