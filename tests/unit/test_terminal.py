"""escape_controls: text from rows cannot drive the operator's terminal (contract section 3)."""

from __future__ import annotations

import pytest

from outbox_relay.admin import FailedRow, Status
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
