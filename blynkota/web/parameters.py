"""The query parameters each admin route takes, read from its OpenAPI description.

An unknown parameter is refused (400, naming it and the closest known one),
never ignored: `start?tag=greenhouse` or `start?usr=me@example.com` would
otherwise start a campaign to every device. The description (openapi.py) is
the one list: a parameter a route reads and the description lacks is refused
too, which its test catches at once.
"""

import difflib
import re

from flask import request

from .openapi import OPENAPI

__all__ = ["unknown_parameter"]


def _known() -> dict[tuple[str, str], frozenset[str]]:
    """(Flask rule, method) -> its query parameters."""
    table = {}
    for path, operations in OPENAPI["paths"].items():
        rule = re.sub(r"\{(\w+)\}", r"<\1>", path)
        for method, operation in operations.items():
            names = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "query"}
            table[(rule, method.upper())] = frozenset(names)
    return table


_KNOWN = _known()


def unknown_parameter() -> str | None:
    """Why this request's query names a parameter its route does not take; None if it does not."""
    rule = request.url_rule
    if rule is None or not request.args:
        return None
    method = "GET" if request.method == "HEAD" else request.method
    known = _KNOWN.get((rule.rule, method))
    if known is None:
        return None  # OPTIONS, or a method the route answers 405 anyway
    for name in request.args:
        if name in known:
            continue
        shown = name if len(name) <= 40 else name[:40] + "…"
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        takes = ", ".join(sorted(known)) if known else "none"
        return f"Unknown parameter {shown!r}{hint}: this route takes {takes}."
    return None
