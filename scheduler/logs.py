"""How every lorafleet process logs: text lines by default, one JSON object per line with `LORAFLEET_LOG_FORMAT=json`
(or `lorafleet --log-format json ...`), for a log pipeline (Loki, Elasticsearch, CloudWatch) to index by field.

A JSON line has `ts` (RFC 3339, UTC), `level`, `logger`, `component` (scheduler, executor, worker, gateway, cli),
`message`, and `exc_info` (the traceback) when there is one; whatever a call passes in `extra=` is kept as fields.
"""

from __future__ import annotations

import datetime
import json
import logging
import os

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# the attributes every LogRecord has: what is left of a record's __dict__ came from `extra=`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def log_format() -> str:
    """`LORAFLEET_LOG_FORMAT`: text (the default) or json; ValueError naming the variable otherwise."""
    value = os.environ.get("LORAFLEET_LOG_FORMAT", "text").strip().lower() or "text"
    if value not in FORMATS:
        raise ValueError(f"LORAFLEET_LOG_FORMAT={value!r}: expected one of {', '.join(FORMATS)}")
    return value


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "component": self.component,
            "message": record.getMessage(),
        }
        line.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def formatter(component: str) -> logging.Formatter:
    return JsonFormatter(component) if log_format() == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(component: str, level: int = logging.INFO) -> None:
    """The root logger of a lorafleet process: one stderr handler in the configured format."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
