"""gevent's HTTP request handler, hardened for a port that faces the network.

- A request head has deadlines: its first line within HTTP_IDLE_TIMEOUT of
  the connection's last request (keep-alive) or its start, its header lines
  within HEAD_DEADLINE after that. A client that sends a byte now and then
  (slowloris) is answered 400 and dropped, however steady its trickle.
- A bad request (over 100 header lines, a malformed line, a late head) is a
  400 and one log line, never a traceback; the client's text is escaped.
- The access log shows a request's path without its query string: `?token=`
  there is a device's token.
- A client that goes away before its answer is written (it closed in the
  middle of an upload, or sent less body than its Content-Length said) is one
  info line in place of the access line: no traceback, no 500. gevent knows
  only EPIPE and ECONNRESET as a peer gone; a TLS peer that vanishes without
  its close_notify raises SSLEOFError instead.
"""

import http.client
import logging
import re
import ssl
from datetime import datetime

import gevent
from gevent.pywsgi import WSGIHandler

from .logsafe import LogBudget, printable, token_tag

__all__ = [
    "HEAD_DEADLINE",
    "HTTP_IDLE_TIMEOUT",
    "RequestHandler",
    "SNIFF_BYTES",
    "looks_like_http",
]

log = logging.getLogger("blynkota.http")

HTTP_IDLE_TIMEOUT = 60.0  # seconds for a request line to arrive (a keep-alive client's pause)
HEAD_DEADLINE = 10.0  # seconds for the header lines once the request line is in
_DEVICE_PATH = "/admin/devices/"
_BAD_REQUEST_LINES = LogBudget(per_second=20)  # a flood of bad requests is counted, not logged
_QUERY = re.compile(r"\?[^\s'\"]*")
# What a write to a client that went away raises, beyond gevent's EPIPE/ECONNRESET.
_CLIENT_GONE = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, TimeoutError)


# What an HTTP request's first bytes are, as the Blynk server tells HTTP from a
# device on a shared port (SPEC §2, §8).
HTTP_METHODS = (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC")
SNIFF_BYTES = 4


def looks_like_http(first_bytes: bytes) -> bool | None:
    """True for HTTP, False for a device, None while the bytes could still be either."""
    for method in HTTP_METHODS:
        if first_bytes[:SNIFF_BYTES] == method[: len(first_bytes)]:
            return True if len(first_bytes) >= SNIFF_BYTES else None
    return False


class RequestHandler(WSGIHandler):
    def read_requestline(self):
        with gevent.Timeout(HTTP_IDLE_TIMEOUT, TimeoutError("no request line in time")):
            return super().read_requestline()

    def read_request(self, raw_requestline):
        try:
            with gevent.Timeout(HEAD_DEADLINE, TimeoutError("request head not complete")):
                return super().read_request(raw_requestline)
        except (http.client.HTTPException, TimeoutError) as error:
            # gevent prints a traceback for anything but ValueError; these are
            # expected bad inputs, answered 400 like the others.
            raise ValueError(
                f"{error} (within {HEAD_DEADLINE:g} s)"
                if isinstance(error, TimeoutError)
                else str(error)
            ) from None

    def handle_error(self, kind, error, traceback) -> None:
        if isinstance(error, _CLIENT_GONE):
            self.close_connection = True
            self._client_gone = error
            return
        super().handle_error(kind, error, traceback)

    def log_request(self) -> None:
        gone = getattr(self, "_client_gone", None)
        if gone is None:
            logger = getattr(self.server.log, "_logger", None)
            if not isinstance(logger, logging.Logger):
                return super().log_request()
            # The line as text, and its fields for log.format=json (logs.JsonLines).
            return logger.info(self.format_request(), extra={"access": self._access_fields()})
        self._client_gone = None
        log.info(
            'request from %s: "%s" ended: the client went away before the answer (%s)',
            self._client() or "-",
            _request_line(self.requestline or ""),
            printable(str(gone) or type(gone).__name__),
        )

    def log_error(self, msg, *args) -> None:
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):
            message = f"{msg} {args!r}"
        allowed, dropped = _BAD_REQUEST_LINES.take()
        if not allowed:
            return
        # gevent quotes the request line of a bad request: its query goes too.
        message = printable(_QUERY.sub("?...", str(message)))
        if dropped:
            message += (
                f" ({dropped} more such lines dropped: over {_BAD_REQUEST_LINES.per_second}/s)"
            )
        log.info("request from %s: %s", self._client() or "-", message)

    def format_request(self) -> str:
        length = self.response_length or "-"
        seconds = f"{self.time_finish - self.time_start:.6f}" if self.time_finish else "-"
        status = (self._orig_status or self.status or "000").split()[0]
        now = datetime.now().replace(microsecond=0)
        line = _request_line(self.requestline or "")
        return f'{self._client() or "-"} - - [{now}] "{line}" {status} {length} {seconds}'

    def _access_fields(self) -> dict:
        parts = _request_line(self.requestline or "").split(" ")
        status = (self._orig_status or self.status or "000").split()[0]
        return {
            "method": parts[0] if len(parts) == 3 else None,
            "path": parts[1] if len(parts) == 3 else None,
            "status": int(status) if status.isdigit() else None,
            "bytes": self.response_length or 0,
            "duration": round(self.time_finish - self.time_start, 6) if self.time_finish else None,
            "client": self._client(),
        }

    def _client(self) -> str | None:
        address = self.client_address
        return address[0] if isinstance(address, tuple) else address


def _request_line(line: str) -> str:
    """`GET /path?query HTTP/1.1` -> `GET /path HTTP/1.1`, escaped; a device's
    token in the path (DELETE /admin/devices/<token>) shows as its tag."""
    parts = line.split(" ")
    if len(parts) == 3:
        path = parts[1].split("?", 1)[0]
        if path.startswith(_DEVICE_PATH):
            path = _DEVICE_PATH + token_tag(path[len(_DEVICE_PATH) :])
        parts[1] = path
    return printable(" ".join(parts))
