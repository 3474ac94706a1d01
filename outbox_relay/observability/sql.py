"""The named queries of ``observability/queries.sql`` (same ``-- name:`` format as the package's)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_NAME_RE = re.compile(r"^-- name: (?P<name>[a-z_]+)\s*$", re.M)


@cache
def _queries() -> dict[str, str]:
    text = (Path(__file__).resolve().parent / "queries.sql").read_text()
    matches = list(_NAME_RE.finditer(text))
    return {
        m["name"]: text[m.end() : nxt.start() if nxt else len(text)].strip()
        for m, nxt in zip(matches, [*matches[1:], None], strict=True)
    }


def query(name: str) -> str:
    """The text of one named query."""
    return _queries()[name]
