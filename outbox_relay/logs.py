"""Logging set-up, done only by the CLI: key=value text or JSON lines on stderr.

Modules log with ``logging.getLogger(__name__)`` and pass structured fields as
``extra={...}``; the formatters print them after the message. A filter scrubs
any ``scheme://user:password@`` it finds, as a last guard for secrets.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from outbox_relay.terminal import escape_controls

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)
_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@", re.I)


def scrub(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    return _CREDENTIALS_RE.sub(r"\g<scheme>\g<user>:***@", text)


def describe(exc: BaseException) -> str:
    """A one-line, secret-free description of an error for logs and messages."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return scrub(f"{name}: {text}" if text else name)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class KeyValueFormatter(logging.Formatter):
    """``2026-11-22T10:00:00Z INFO outbox_relay.relay enqueued rows count=12``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name} {record.getMessage()}"
        fields = " ".join(f"{k}={_kv(v)}" for k, v in _fields(record).items())
        if fields:
            line = f"{line} {fields}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return scrub(line)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, default=str))


def _kv(value: Any) -> str:
    """A field's value: JSON-quoted (every control or non-ASCII character escaped) when it holds a
    space or a character :func:`escape_controls` would escape (row text may reach a terminal)."""
    text = str(value)
    return json.dumps(text) if (" " in text or not text or escape_controls(text) != text) else text


def _plain_library_lines(record: logging.LogRecord) -> bool:
    """arq logs a job it gave up on (its own timeout, e.g. after the process was
    stopped and resumed) with a traceback: keep its one line, which names the error."""
    if record.name == "arq" or record.name.startswith("arq."):
        record.exc_info = None
        record.exc_text = None
    return True


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the root logger (the CLI calls this once)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(_plain_library_lines)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # arq logs every job start and end at INFO: far too chatty for a relay's log.
    logging.getLogger("arq").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("asyncio").setLevel(logging.WARNING)
