"""Text from rows, made safe for a terminal (contract section 3)."""

from __future__ import annotations

import re

#: C0 controls, DEL and C1 controls (what can move a cursor, clear a screen or forge a line),
#: and the backslash that introduces an escape.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    return _NAMED.get(char) or f"\\x{ord(char):02x}"


def escape_controls(text: str) -> str:
    r"""``text`` with every control character shown as an escape (``\n``, ``\x1b``, ``\x9b``).

    A backslash is doubled, so an escaped value cannot be mistaken for one
    whose text really holds ``\x1b``; everything else (any printable Unicode)
    is kept as is.
    """
    return _CONTROLS.sub(_escape, text)
