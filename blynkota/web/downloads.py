"""Firmware files for devices, over plain HTTP (ESP8266 updaters cannot do TLS):
the Flask fallback for what the sendfile path hands over (file_sender.py).

It answers the same way, by the same rules (download_rules.py); what it adds
are the conditional requests (If-None-Match, If-Modified-Since, If-Range),
which werkzeug judges, and the odd heads the fast path will not parse.
"""

import os
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request
from werkzeug.wsgi import wrap_file

from ..ota import OtaService
from .download_rules import DownloadCount, file_headers, not_needed, runs_this_file, single_range

__all__ = ["downloads"]

downloads = Blueprint("downloads", __name__)


class _CountedBody:
    """The response body, counting what the server wrote when it closes it."""

    def __init__(self, body, count: DownloadCount):
        self._body, self._count = body, count
        self._sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            yield chunk
            # Asked for the next chunk: the server wrote this one.
            self._sent += len(chunk)
            self._count.wrote(len(chunk))

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()
        self._count.ended(self._sent)


@downloads.route("/static/ota/<name>.bin", methods=["GET", "HEAD"])
def firmware_file(name: str) -> Response:
    service: OtaService = current_app.extensions["blynkota"]
    firmware = service.catalog.file(name)
    if firmware is None:
        return Response("No such firmware.\n", 404, mimetype="text/plain")
    path = service.catalog.local_file(firmware)
    headers = file_headers(firmware, os.stat(path).st_mtime)
    request_headers = {header.lower(): value for header, value in request.headers.items()}
    if runs_this_file(request_headers, firmware.md5):
        not_needed(service.downloads, firmware, request.args.get("o"), request.method)
        return Response(status=304, headers=headers)
    if single_range(request.headers.get("Range")) is None:
        # Several ranges, or a malformed one: ignored, the whole file goes
        # (werkzeug would answer 416), as on the fast path.
        request.environ.pop("HTTP_RANGE", None)
    file = open(path, "rb")  # noqa: SIM115 (closed by the response, or below)
    try:
        response = Response(
            wrap_file(request.environ, file), headers=headers, direct_passthrough=True
        )
        response.content_length = firmware.size
        response.set_etag(firmware.md5)
        response.make_conditional(request, accept_ranges=True, complete_length=firmware.size)
    except BaseException:  # 416 for a range past the end
        file.close()
        raise
    if response.status_code not in (200, 206):  # 304 to a conditional request: no body
        file.close()
    if request.method == "GET" and response.status_code in (200, 206):
        start = response.content_range.start if response.status_code == 206 else 0
        count = DownloadCount(
            service.downloads,
            firmware,
            request.args.get("o"),
            start,
            response.content_length,
        )
        response.response = _CountedBody(response.response, count)
    return response
