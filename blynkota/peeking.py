"""Waiting for the rest of a request that was peeked (MSG_PEEK) and found incomplete.

A peek leaves the bytes in the socket, so the socket stays readable and
waiting for readability would return at once: a spin. So the next peek comes
after a sleep that starts short (a head sent in pieces by a real client
completes within milliseconds) and doubles, so that a client that stops
halfway (`G`, `PO`, half a header) costs a few wake-ups per second at most.
Used by the device port's sniffing and by the firmware sender.
"""

from collections.abc import Iterator

__all__ = ["peek_waits"]

FIRST_WAIT = 0.01  # seconds before the second peek
LONGEST_WAIT = 0.5  # the wait doubles up to this


def peek_waits() -> Iterator[float]:
    """Seconds to sleep before each further peek: 0.01, 0.02, 0.04, ... 0.5, 0.5, ..."""
    wait = FIRST_WAIT
    while True:
        yield wait
        wait = min(2 * wait, LONGEST_WAIT)
