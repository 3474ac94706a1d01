"""Logging: secret scrubbing, key=value and JSON formatters with structured fields."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from outbox_relay import logs
from outbox_relay.logs import JsonFormatter, KeyValueFormatter, scrub

PASSWORD = "hunter2-s3cret"
DB_URL = f"postgresql://svc:{PASSWORD}@db.example:5432/svc"


def make_record(
    msg: str, *args: Any, extra: dict[str, Any] | None = None, exc: BaseException | None = None
) -> logging.LogRecord:
    """A record as ``logger.warning(msg, *args, extra=extra)`` would make it."""
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.getLogger("outbox_relay.test").makeRecord(
        "outbox_relay.test", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra
    )


def raised(exc: BaseException) -> BaseException:
    """``exc`` after a raise, so that it carries a traceback."""
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"cannot reach {DB_URL} now", "cannot reach postgresql://svc:***@db.example:5432/svc now"),
        (f"redis://:{PASSWORD}@cache/0", "redis://:***@cache/0"),
        (
            f"a postgres://u:{PASSWORD}@h1/x and rediss://v:{PASSWORD}@h2:6380/1.",
            "a postgres://u:***@h1/x and rediss://v:***@h2:6380/1.",
        ),
    ],
)
def test_scrub_removes_passwords_from_urls_in_free_text(text: str, expected: str) -> None:
    """scrub() replaces every URL password in free text with *** and keeps the rest."""
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text", ["postgresql://svc@db.example/svc", "plain text: no url", "time 10:30, user@example.com"]
)
def test_scrub_leaves_text_without_url_passwords_alone(text: str) -> None:
    """Text with no URL password comes back unchanged."""
    assert scrub(text) == text


def test_key_value_formatter_prints_message_level_logger_and_extra_fields() -> None:
    """The text line holds level, logger, the formatted message and each extra field as key=value."""
    line = KeyValueFormatter().format(
        make_record("enqueued %d rows", 12, extra={"count": 12, "queue": "orders", "note": "two words"})
    )
    assert "\n" not in line
    assert " WARNING outbox_relay.test enqueued 12 rows" in line
    assert "count=12" in line
    assert "queue=orders" in line
    assert 'note="two words"' in line


def test_key_value_formatter_scrubs_secrets_in_message_extra_and_traceback() -> None:
    """No password reaches the text line, whether in the message, an extra field or an exception."""
    record = make_record(
        "cannot reach %s", DB_URL, extra={"url": DB_URL}, exc=raised(OSError(f"refused: {DB_URL}"))
    )
    line = KeyValueFormatter().format(record)
    assert PASSWORD not in line
    assert "postgresql://svc:***@db.example:5432/svc" in line
    assert "OSError" in line


def test_json_formatter_writes_one_valid_json_object_with_the_fields() -> None:
    """The JSON line parses and holds level, logger, message and the extra fields, values typed."""
    line = JsonFormatter().format(make_record("enqueued %d rows", 3, extra={"count": 3, "queue": "orders"}))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "outbox_relay.test"
    assert entry["message"] == "enqueued 3 rows"
    assert entry["count"] == 3
    assert entry["queue"] == "orders"
    assert isinstance(entry["time"], float)
    assert "msg" not in entry
    assert "args" not in entry


def test_json_formatter_scrubs_secrets_and_stays_valid_json() -> None:
    """Passwords are scrubbed from message, fields and exception, and the output still parses."""
    record = make_record(
        "cannot reach %s", DB_URL, extra={"url": DB_URL}, exc=raised(OSError(f"refused: {DB_URL}"))
    )
    line = JsonFormatter().format(record)
    assert PASSWORD not in line
    entry = json.loads(line)
    assert entry["message"] == "cannot reach postgresql://svc:***@db.example:5432/svc"
    assert entry["url"] == "postgresql://svc:***@db.example:5432/svc"
    assert "OSError" in entry["exception"]


def test_json_formatter_serialises_non_json_values() -> None:
    """An extra field that JSON cannot encode (an object) is written as its str(), not an error."""
    entry = json.loads(JsonFormatter().format(make_record("x", extra={"ids": {7}})))
    assert entry["ids"] == "{7}"


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """Put the root, arq and asyncio loggers back as they were after configure()."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    levels = {name: logging.getLogger(name).level for name in ("arq", "asyncio")}
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize(("fmt", "formatter"), [("json", JsonFormatter), ("text", KeyValueFormatter)])
def test_configure_installs_one_stderr_handler_with_the_chosen_format(
    fmt: str, formatter: type[logging.Formatter]
) -> None:
    """configure() leaves exactly one root handler, on stderr, with the asked format and level."""
    logs.configure("DEBUG", fmt)
    root = logging.getLogger()
    assert len(root.handlers) == 1
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is sys.stderr
    assert isinstance(handler.formatter, formatter)
    assert root.level == logging.DEBUG
    assert logging.getLogger("arq").level >= logging.WARNING
