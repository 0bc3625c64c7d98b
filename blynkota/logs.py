"""Log records as text (the default) or one JSON object per line (`log.format=json`).

A JSON line has `time`, `level`, `logger` and `event` (the message), and,
where known, `device` (the token's tag, never the token), `rollout` and
`node`. A device session's greenlet sets DEVICE_TAG once logged in, so all
its lines carry the device; other lines pass `extra={"device": ..,
"rollout": ..}`.
"""

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["DEVICE_TAG", "JsonLines", "configure_logging", "set_node_name"]

# Per greenlet under gevent (each greenlet runs in its own context).
DEVICE_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("device", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_node = {"name": None}  # this process's node, once registered


def set_node_name(name: str) -> None:
    _node["name"] = name


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
