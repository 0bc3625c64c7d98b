"""The web side: admin API (HTTPS) and firmware downloads (plain HTTP)."""

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .admin import admin
from .dashboard import dashboard
from .downloads import downloads
from .file_sender import FirmwareSender
from .https_server import AdminHttpsServer
from .ops import Readiness, ops
from .proxies import TrustedProxies

__all__ = ["AdminHttpsServer", "FirmwareSender", "Readiness", "init_app"]


def _one_line_error(error: HTTPException) -> Response:
    if error.code == 413:
        limit = request.max_content_length
        message = f"The upload is larger than ota.max.size allows ({limit} bytes with form data)."
    else:
        message = f"{error.name}: {error.description}"
    return Response(message + "\n", error.code, mimetype="text/plain")


def init_app(app: Flask) -> None:
    app.register_blueprint(admin)
    app.register_blueprint(dashboard)
    app.register_blueprint(downloads)
    app.register_blueprint(ops)
    app.extensions["blynkota.readiness"] = Readiness()
    app.register_error_handler(HTTPException, _one_line_error)
    app.wsgi_app = TrustedProxies(app.wsgi_app, app.config["SETTINGS"].trusted_proxies)
