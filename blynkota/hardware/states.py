"""The device session's states and every allowed transition, in one table.

A transition not in the table is a bug in the session code and raises.
"""

from enum import Enum

__all__ = ["SessionState", "SessionStateMachine", "IllegalTransition"]


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
    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = SessionState.AWAITING_LOGIN

    def advance(self, event: str) -> SessionState:
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(f"{event!r} in state {self.state.value!r}") from None
        return self.state
