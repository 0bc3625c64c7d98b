"""Cross-site request forgery: browsers send basic auth on their own.

A browser that holds the admin's credentials would send them with a form
another site makes it post. So a state-changing request that comes from a
browser (it carries Origin or Sec-Fetch-Site, which browsers add and sites
cannot remove) must carry the dashboard's token: the `csrf_token` form field
or the X-CSRF-Token header. Scripts (curl, the CLI) send neither header and
are not asked for one.
"""

import hmac

from flask import Response, current_app, g, request

__all__ = ["check_csrf", "csrf_token"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def csrf_token() -> str:
    """The signed-in admin's token, for templates."""
    if "csrf_token" not in g:
        email = request.authorization.username if request.authorization else ""
        admins = current_app.extensions["blynkota.admins"]
        g.csrf_token = (email and admins.csrf_token(email)) or ""
    return g.csrf_token


def _from_browser() -> bool:
    return "Origin" in request.headers or "Sec-Fetch-Site" in request.headers


def check_csrf() -> Response | None:
    """Refuse a browser's state-changing request without the right token (403)."""
    if request.method in SAFE_METHODS or not _from_browser():
        return None
    if request.authorization is None:
        return None  # the route's basic auth answers 401
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token", "")
    expected = csrf_token()
    if expected and hmac.compare_digest(sent.encode(), expected.encode()):
        return None
    return Response(
        "Cross-site request refused: a browser's request needs the dashboard's csrf_token "
        "(reload the page).\n",
        403,
        mimetype="text/plain",
    )
