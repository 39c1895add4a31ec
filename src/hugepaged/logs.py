"""Logging: human lines by default, one JSON object per line with --log-format json.

Under systemd (stderr connected to the journal, as $JOURNAL_STREAM says), every line starts
with its syslog priority as an sd-daemon prefix (`<3>` error, `<4>` warning, `<6>` info,
`<7>` debug; see sd-daemon(3)), which journald strips and stores as PRIORITY=, so
`journalctl -p warning -u hugepaged` shows the warnings; text lines then carry no timestamp
of their own (the journal has one). JSON lines keep their `time` field: it is part of the
versioned record shape.

Why no library: systemd-python's JournalHandler is a C extension built against libsystemd's
headers (pip cannot install it on a stock machine without a compiler and libsystemd-dev), and
the stream protocol it would replace is one prefix per line. python-json-logger would replace
the ten lines of JsonFormatter with a dependency; the stdlib's logging does the rest.
"""

import json
import logging
import os
import sys
import time

from hugepaged.names import printable

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# logging's levels as syslog priorities (sd-daemon prefixes).
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
              logging.DEBUG: 7}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a level between two takes the lower one's)."""
    return next((p for lvl, p in sorted(PRIORITIES.items(), reverse=True) if levelno >= lvl), 7)


def journal_stream(stream, environ=None) -> bool:
    """Whether `stream` is connected to the journal: $JOURNAL_STREAM is "DEVICE:INODE" of the
    stream systemd gave us, and it is still the one we write to (a child whose stderr was
    redirected inherits the variable but not the journal), as sd_journal_stream_fd's users
    are told to check."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):  # no fd (a StringIO), or a malformed value
        return False


def journal_prefix(stream, prio: int) -> str:
    """`<prio>` where `stream` is the journal, else nothing: for the one-line error the command
    line prints before logging is set up (a refused configuration), so that it too is
    PRIORITY=3 in the journal rather than the stream's default, info."""
    return f"<{prio}>" if journal_stream(stream) else ""


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


class JournalPrefix(logging.Formatter):
    """Another formatter's output with the record's sd-daemon prefix on every line (a
    traceback's lines too: journald reads each line as a record of its own)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


TEXT = "%(asctime)s hugepaged %(levelname)s: %(message)s"
TEXT_JOURNAL = "%(levelname)s: %(message)s"  # the journal adds time and identifier


def setup_logging(fmt: str = "text", level: str = "info", stream=None, environ=None) -> None:
    stream = stream or sys.stderr
    journal = journal_stream(stream, environ)
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = TextFormatter(TEXT_JOURNAL if journal else TEXT)
    handler.setFormatter(JournalPrefix(formatter) if journal else formatter)
    root = logging.getLogger("hugepaged")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
