"""Firmware files for devices, over plain HTTP (ESP8266 updaters cannot do TLS).

What the tiny updaters need (SPEC §4): a Content-Length, octet-stream, an
`x-MD5` in lowercase hex, no chunking, no redirect. Range requests are
answered too, so an interrupted download can resume.
"""

from flask import Blueprint, Response, current_app, send_file

__all__ = ["downloads"]

downloads = Blueprint("downloads", __name__)


@downloads.route("/static/ota/<name>.bin", methods=["GET", "HEAD"])
def firmware_file(name: str) -> Response:
    service = current_app.extensions["blynkota"]
    firmware = service.firmware_file(name)
    if firmware is None:
        return Response("No such firmware.\n", 404, mimetype="text/plain")
    response = send_file(
        service.store.path(firmware.name),
        mimetype="application/octet-stream",
        conditional=True,
        etag=firmware.md5,
        max_age=0,
    )
    response.headers["x-MD5"] = firmware.md5
    return response
