"""Log records as text (the default) or one JSON object per line (`log.format=json`).

A JSON line has `time`, `level`, `logger` and `event` (the message), and,
where known, `device` (the token's tag, never the token), `rollout` and
`node`. A device session's greenlet sets DEVICE_TAG once logged in, so all
its lines carry the device; other lines pass `extra={"device": ..,
"rollout": ..}`.

A login storm logs a line per device (and one per offer). Those lines,
logged with `extra=PER_TURN`, are written together at the end of the turn
of the event loop they were logged in (`LinesPerTurn`): one system call
instead of thousands, and none waits longer than the turn. Every other line
is written at once, after the held ones, so the log keeps its order and a
line about an event is in the log before the event is seen from outside.
The text format's time is formatted once per second, not per line.
"""

import contextvars
import json
import logging
import sys
import time
from datetime import UTC, datetime

import gevent
from gevent.monkey import get_original

__all__ = [
    "DEVICE_TAG",
    "JsonLines",
    "LinesPerTurn",
    "PER_TURN",
    "TextLines",
    "configure_logging",
    "set_node_name",
]

# Per greenlet under gevent (each greenlet runs in its own context).
DEVICE_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("device", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_node = {"name": None}  # this process's node, once registered

# `extra` of the lines logged for every device of a storm: written once per turn.
PER_TURN = {"per_turn": True}


def set_node_name(name: str) -> None:
    _node["name"] = name


# The operating system's thread id, even where gevent has patched `_thread`.
_thread_id = get_original("_thread", "get_ident")
_NativeRLock = get_original("_thread", "RLock")


class LinesPerTurn(logging.StreamHandler):
    """Writes the lines logged with `extra=PER_TURN` once per turn of the event
    loop; every other line at once, after those held (logging's shutdown
    flushes what is held at exit)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._loop = gevent.get_hub().loop
        self._loop_thread = _thread_id()

    def createLock(self) -> None:  # noqa: N802
        # Held only around `emit`, which never waits (no greenlet switch can
        # happen inside it): the interpreter's own lock serves, where
        # gevent's, patched into `threading`, costs a dozen Python calls a line.
        super().createLock()  # registered for re-initialising after a fork
        self.lock = _NativeRLock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if getattr(record, "per_turn", False) and _thread_id() == self._loop_thread:
            self._lines.append(line)
            if len(self._lines) == 1:
                self._loop.run_callback(self.flush)
            return
        lines, self._lines = self._lines, []
        lines.append(line)
        self._write(lines)

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(None)


class TextLines(logging.Formatter):
    """TEXT_FORMAT, its time formatted once per second (strftime is a
    large part of formatting a short line), and a line without a traceback
    put together directly rather than by `%` with the record's fields."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: int | None = None
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"  # default_msec_format

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name}: {record.message}"


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        device = getattr(record, "device", None) or DEVICE_TAG.get()
        if device:
            line["device"] = device
        rollout = getattr(record, "rollout", None)
        if rollout is not None:
            line["rollout"] = rollout
        access = getattr(record, "access", None)  # an HTTP request's (http_handler.py)
        if access:
            line.update(access)
        if _node["name"]:
            line["node"] = _node["name"]
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    # No thread or process fields: without these, every record asks
    # threading.current_thread(), which under gevent builds a dummy thread
    # object for each new greenlet (each device session's first line).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Nor the caller's file and line, which no format here shows: finding
    # them walks the stack for every record (the logging HOWTO's optimisation).
    logging._srcfile = None
    handler = LinesPerTurn(sys.stderr)
    handler.setFormatter(JsonLines() if log_format == "json" else TextLines())
    logging.basicConfig(level=level, handlers=[handler], force=True)
