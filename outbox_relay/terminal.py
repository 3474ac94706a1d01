"""Text from rows, made safe for a terminal (contract section 3)."""

from __future__ import annotations

import re
import unicodedata

#: C0 controls, DEL and C1 controls (what can move a cursor, clear a screen or forge a line),
#: the backslash that introduces an escape, and any other non-ASCII character, kept unless
#: :data:`_INVISIBLE` (checked per character: ASCII text costs nothing more).
_CANDIDATES = re.compile(r"[\x00-\x1f\x7f-\x9f\\]|[^\x00-\x7f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
#: Unicode categories escaped besides the controls: format characters (Cf: the bidi overrides
#: and isolates U+202A-202E, U+2066-2069, marks U+200E/F, zero-width characters, soft hyphen,
#: tags) and the line and paragraph separators (Zl U+2028, Zp U+2029). They are invisible or
#: reorder what the operator reads.
_INVISIBLE = frozenset({"Cf", "Zl", "Zp"})


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    code = ord(char)
    if code < 0xA0:
        return _NAMED.get(char) or f"\\x{code:02x}"
    if unicodedata.category(char) not in _INVISIBLE:
        return char
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape_controls(text: str) -> str:
    r"""``text`` with every control or invisible format character shown as an escape (``\n``,
    ``\x1b``, ``\x9b``, ``\u202e``, ``\U000e0041``).

    A backslash is doubled, so an escaped value cannot be mistaken for one
    whose text really holds ``\x1b``; everything else (any printable Unicode)
    is kept as is.
    """
    return _CANDIDATES.sub(_escape, text)
