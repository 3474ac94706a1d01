"""Loads the SQL that lives in ``.sql`` files: named queries and versioned migrations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from outbox_relay.exceptions import MigrationError

_PACKAGE_DIR = Path(__file__).resolve().parent
_NAME_RE = re.compile(r"^-- name: (?P<name>[a-z_]+)\s*$", re.M)
_MIGRATION_RE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@cache
def queries() -> dict[str, str]:
    """Every named query of ``queries.sql``."""
    text = (_PACKAGE_DIR / "queries.sql").read_text()
    found: dict[str, str] = {}
    matches = list(_NAME_RE.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        body = text[match.end() : following.start() if following else len(text)]
        found[match["name"]] = body.strip()
    return found


def query(name: str) -> str:
    """The text of one named query."""
    return queries()[name]


@dataclass(frozen=True)
class Migration:
    """One versioned migration file."""

    target: str
    version: int
    name: str
    sql: str


def migrations_dir() -> Path:
    """``migrations/``: inside the installed package, or at the top of a source checkout."""
    for candidate in (_PACKAGE_DIR / "migrations", _PACKAGE_DIR.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise MigrationError("migrations directory not found next to the outbox_relay package")


def migrations(target: str) -> list[Migration]:
    """The migrations of ``target`` (``service`` or ``primary``), in version order."""
    found: list[Migration] = []
    for path in sorted((migrations_dir() / target).glob("*.sql")):
        match = _MIGRATION_RE.match(path.name)
        if match is None:
            raise MigrationError(f"badly named migration file: {path.name} (want NNNN_name.sql)")
        found.append(Migration(target, int(match["version"]), match["name"], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two {target} migrations share a version number")
    return found
