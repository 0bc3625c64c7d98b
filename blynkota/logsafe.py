"""What may reach the log from outside, and in what form.

- A device token is a password: the log shows a tag instead, the first
  hex digits of its SHA-256, enough to tell devices apart and to find one
  (`flask devices list` shows each device's tag), useless to log in with.
- Text a client chose (a request line, a token that was refused) is cut
  to a length and its control bytes escaped, so it cannot forge log lines
  or send escape sequences to an operator's terminal.
- The access log shows the path of a request without its query string:
  `?token=` there is a device's token (http_handler.py).
"""

import hashlib

__all__ = ["printable", "token_tag"]

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
