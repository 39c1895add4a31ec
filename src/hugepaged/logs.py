"""Logging: human lines by default, one JSON object per line with --log-format json."""

import json
import logging
import sys
import time

from hugepaged.names import printable

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Every `extra=` field of a record becomes a key, next to time, level and message."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "message": record.getMessage()}
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """Human lines; the message's control characters escaped, so a name holding a newline
    cannot forge a line (tracebacks, appended after it, keep theirs)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)


def setup_logging(fmt: str = "text", level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s hugepaged %(levelname)s: %(message)s"))
    root = logging.getLogger("hugepaged")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
