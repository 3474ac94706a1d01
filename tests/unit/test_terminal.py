"""escape_controls: text from rows cannot drive the operator's terminal (contract section 3)."""

from __future__ import annotations

import logging
import sys
import unicodedata

import pytest

from outbox_relay.admin import FailedRow, Status
from outbox_relay.logs import KeyValueFormatter
from outbox_relay.terminal import escape_controls


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain-id-42", "plain-id-42"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),  # ESC: clear screen
        ("line\nforged line", "line\\nforged line"),
        ("cr\roverwrite", "cr\\roverwrite"),
        ("tab\there", "tab\\there"),
        ("nul\x00", "nul\\x00"),
        ("del\x7f", "del\\x7f"),
        ("csi\x9b31m", "csi\\x9b31m"),  # C1 CSI
        ("osc\x9d0;title\x9c", "osc\\x9d0;title\\x9c"),
        ("back\\x1b", "back\\\\x1b"),  # a literal backslash cannot pose as an escape
        ("ünïcødé ✓ 日本", "ünïcødé ✓ 日本"),
    ],
)
def test_escape_controls(raw: str, shown: str) -> None:
    """C0, DEL and C1 controls become visible escapes; printable text (any script) is kept."""
    assert escape_controls(raw) == shown


def test_every_control_character_is_escaped() -> None:
    """No character of U+0000-U+001F, U+007F-U+009F survives escaping."""
    controls = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))
    escaped = escape_controls(controls)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in escaped)


def test_status_text_escapes_row_values() -> None:
    """status's text report shows an id, kind and error holding ESC and newlines on one line, escaped."""
    row = FailedRow("id\x1b[2J\nfake: ok", "k\x9bind", 3, "boom\r\nnew line")
    text = Status({"new": 0, "queued": 0, "finished": 0, "failed": 1}, None, [row]).as_text()
    assert "\x1b" not in text
    assert "\x9b" not in text
    assert "\r" not in text
    failed_line = text.splitlines()[-1]
    assert failed_line == (
        "  id\\x1b[2J\\nfake: ok  kind=k\\x9bind  attempts=3  failures=0  error=boom\\r\\nnew line"
    )


def test_status_text_shows_the_failure_count_and_the_newest_error_escaped() -> None:
    """status's text shows how many failures the history holds and its newest error, escaped."""
    history = [
        {"at": "2026-01-01T00:00:00+00:00", "attempt": 1, "error": "first"},
        {"at": "2026-01-01T00:00:01+00:00", "attempt": 2, "error": "second\x1b[31m red"},
    ]
    row = FailedRow("id-1", "reservation", 2, "second\x1b[31m red", history)
    text = Status({"new": 0, "queued": 0, "finished": 0, "failed": 1}, None, [row]).as_text()
    expected = "  id-1  kind=reservation  attempts=2  failures=2  error=second\\x1b[31m red"
    assert text.splitlines()[-1] == expected
    assert "\x1b" not in text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("abc\u202eevil", "abc\\u202eevil"),  # RIGHT-TO-LEFT OVERRIDE
        ("\u202dltr\u202c", "\\u202dltr\\u202c"),  # LEFT-TO-RIGHT OVERRIDE, POP DIRECTIONAL FORMATTING
        ("\u2066a\u2067b\u2068c\u2069", "\\u2066a\\u2067b\\u2068c\\u2069"),  # isolates
        ("\u200e\u200f", "\\u200e\\u200f"),  # LRM, RLM
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("soft\u00adhyphen", "soft\\u00adhyphen"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("tag\U000e0041", "tag\\U000e0041"),
        (
            "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 🙂",
            "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 🙂",
        ),
    ],
)
def test_invisible_format_characters_are_escaped(raw: str, shown: str) -> None:
    """Issue 15.5: bidi overrides and isolates, other format characters (Cf) and the line and
    paragraph separators become visible escapes; right-to-left scripts and emoji are kept."""
    assert escape_controls(raw) == shown


def test_every_format_character_is_escaped() -> None:
    """No character of Unicode categories Cf, Zl or Zp survives escaping."""
    invisible = "".join(
        c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c) in ("Cf", "Zl", "Zp")
    )
    escaped = escape_controls(invisible)
    assert not [c for c in escaped if unicodedata.category(c) in ("Cf", "Zl", "Zp")]


def test_status_text_and_log_fields_escape_a_bidi_override() -> None:
    """status's text and a key=value log field show U+202E as an escape, never raw."""
    row = FailedRow("pay\u202eusd", "kind", 1, "err\u2066")
    text = Status({"new": 0, "queued": 0, "finished": 0, "failed": 1}, None, [row]).as_text()
    assert "\u202e" not in text
    assert "pay\\u202eusd" in text
    record = logging.LogRecord("x", logging.WARNING, "", 0, "row failed", (), None)
    record.error = "boom\u202e\x1b[2J"
    line = KeyValueFormatter().format(record)
    assert line.endswith('error="boom\\u202e\\u001b[2J"'), line
