"""What may reach the log from outside, and in what form.

- A device token is a password: the log shows a tag instead, the first
  hex digits of its SHA-256, enough to tell devices apart and to find one
  (`flask devices list` shows each device's tag), useless to log in with.
- Lines a client can cause at will (a bad request) have a budget per
  second; past it they are counted, and the count is logged with the next
  line, so a flood of bad requests cannot flood the log.
- Text a client chose (a request line, a token that was refused) is cut
  to a length and its control bytes escaped, so it cannot forge log lines
  or send escape sequences to an operator's terminal.
- The access log shows the path of a request without its query string:
  `?token=` there is a device's token (http_handler.py).
"""

import hashlib
import time

__all__ = ["LogBudget", "printable", "token_tag"]

TAG_DIGITS = 10


def token_tag(token: str) -> str:
    """`t:` and the first hex digits of the token's SHA-256 ('-' for none)."""
    if not token:
        return "-"
    return "t:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:TAG_DIGITS]


def printable(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, anything unprintable escaped (\\x1b, \\r, ...)."""
    cut = text[:limit]
    if cut.isprintable():
        return cut + ("..." if len(text) > limit else "")
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return escaped + ("..." if len(text) > limit else "")


class LogBudget:
    """At most `per_second` lines a second; the rest counted, and reported after."""

    def __init__(self, per_second: int = 20) -> None:
        self.per_second = per_second
        self._second = 0
        self._used = 0
        self._dropped = 0

    def take(self) -> tuple[bool, int]:
        """(may this line be logged, how many were dropped since the last one logged)."""
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._used = second, 0
        if self._used >= self.per_second:
            self._dropped += 1
            return False, 0
        self._used += 1
        dropped, self._dropped = self._dropped, 0
        return True, dropped
