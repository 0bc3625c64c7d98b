"""The web side: admin API (HTTPS) and firmware downloads (plain HTTP)."""

import logging

from flask import Flask, Response, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from ..store import is_unavailable
from .admin import admin
from .dashboard import dashboard
from .downloads import downloads
from .file_sender import FirmwareSender
from .https_server import AdminHttpsServer
from .ops import Readiness, ops
from .proxies import TrustedProxies

__all__ = ["AdminHttpsServer", "FirmwareSender", "Readiness", "init_app"]

log = logging.getLogger(__name__)

DATABASE_RETRY_AFTER = 5  # seconds a client is asked to wait when the database is away


def _one_line_error(error: HTTPException) -> Response:
    if error.code == 413:
        limit = request.max_content_length
        message = f"The upload is larger than ota.max.size allows ({limit} bytes with form data)."
    else:
        message = f"{error.name}: {error.description}"
    return Response(message + "\n", error.code, mimetype="text/plain")


def _database_unavailable(error: SQLAlchemyError) -> Response:
    """The database is away, locked past the wait, or every pooled connection is
    busy: an expected condition, answered 503 with one line and logged without
    a traceback."""
    if not is_unavailable(error):
        raise error  # a fault of ours: Flask logs it with its traceback and answers 500
    # The route, not the path: DELETE /admin/devices/<token> has a token in it.
    route = request.url_rule.rule if request.url_rule is not None else "-"
    log.info("%s %s: the database is unavailable (%s)", request.method, route,
             type(error).__name__)  # fmt: skip
    answer = Response(
        "The database is unavailable: try again shortly.\n", 503, mimetype="text/plain"
    )
    answer.headers["Retry-After"] = str(DATABASE_RETRY_AFTER)
    return answer


def init_app(app: Flask) -> None:
    app.register_blueprint(admin)
    app.register_blueprint(dashboard)
    app.register_blueprint(downloads)
    app.register_blueprint(ops)
    app.extensions["blynkota.readiness"] = Readiness()
    app.register_error_handler(HTTPException, _one_line_error)
    app.register_error_handler(SQLAlchemyError, _database_unavailable)
    app.wsgi_app = TrustedProxies(app.wsgi_app, app.config["SETTINGS"].trusted_proxies)
