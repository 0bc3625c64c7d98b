"""Firmware files for devices, over plain HTTP (ESP8266 updaters cannot do TLS).

What the tiny updaters need (SPEC §4): a Content-Length, octet-stream, an
`x-MD5` in lowercase hex, no chunking, no redirect. Range requests are
answered too, so an interrupted download can resume. An updater whose
sketch MD5 header is the file's MD5 runs it already: 304 ("no update").

A URL from an `ota` command carries the offer's key (`?o=`): the body is then
counted as it is written, so the rollout learns that the device is
downloading, whether every byte went out, or where the download broke off.
"""

from collections.abc import Iterable, Iterator

from flask import Blueprint, Response, current_app, request, send_file

from .. import metrics
from ..ota import DownloadTicket, OtaService
from .file_sender import runs_this_file, single_range

__all__ = ["downloads"]

downloads = Blueprint("downloads", __name__)


class _CountedBody:
    """The response body, reporting how far it got when the server closes it.

    With an offer's ticket the rollout learns it too; every body is counted
    in the metrics.
    """

    def __init__(self, body: Iterable[bytes], ticket: DownloadTicket | None, service: OtaService):
        self._body, self._ticket, self._service = body, ticket, service
        self._sent = 0
        self._finished = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            yield chunk
            # Asked for the next chunk: the server wrote this one.
            self._sent += len(chunk)
            if self._ticket is not None:
                self._ticket.written_until += len(chunk)
        self._finished = True

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()
        metrics.count_download(self._sent, complete=self._finished)
        if self._ticket is not None:
            self._service.download_finished(self._ticket, complete=self._finished)


@downloads.route("/static/ota/<name>.bin", methods=["GET", "HEAD"])
def firmware_file(name: str) -> Response:
    service: OtaService = current_app.extensions["blynkota"]
    firmware = service.catalog.file(name)
    if firmware is None:
        return Response("No such firmware.\n", 404, mimetype="text/plain")
    headers = {header.lower(): value for header, value in request.headers.items()}
    if runs_this_file(headers, firmware.md5):
        if request.method == "GET":
            service.already_running(firmware, request.args.get("o"))
        answer = Response(status=304)
        answer.headers["x-MD5"] = firmware.md5
        answer.headers["ETag"] = f'"{firmware.md5}"'
        return answer
    if single_range(request.headers.get("Range")) is None:
        # Several ranges, or a malformed one: ignored, the whole file goes
        # (werkzeug would answer 416), as on the fast path (file_sender.py).
        request.environ.pop("HTTP_RANGE", None)
    response = send_file(
        service.catalog.local_file(firmware),
        mimetype="application/octet-stream",
        conditional=True,
        etag=firmware.md5,
        max_age=0,
    )
    response.headers["x-MD5"] = firmware.md5
    # The cache file's name is its SHA-256: nothing a device needs (file_sender.py omits it too).
    response.headers.pop("Content-Disposition", None)
    if request.method == "GET" and response.status_code in (200, 206):
        start = response.content_range.start if response.status_code == 206 else 0
        ticket = service.download_started(firmware, request.args.get("o"), start)
        metrics.DOWNLOADS_STARTED.inc()
        response.response = _CountedBody(response.response, ticket, service)
    return response
