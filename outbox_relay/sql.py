"""Loads the SQL that lives in ``.sql`` files: named queries and versioned migration sets.

A query file holds blocks, each from its ``-- name: NAME`` line to the next one.
The core's queries are in ``outbox_relay/queries.sql`` (:func:`query`); a plugin
keeps its own file next to its code and loads it with :class:`QueryFile`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from outbox_relay.exceptions import MigrationError

_PACKAGE_DIR = Path(__file__).resolve().parent
_NAME_RE = re.compile(r"^-- name: (?P<name>[a-z_]+)\s*$", re.M)
_MIGRATION_RE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_PLACEHOLDER_RE = re.compile(r"\{(?P<name>[a-z_]+)\}")


class QueryFile:
    """The named blocks of one ``.sql`` file, read on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @cached_property
    def queries(self) -> dict[str, str]:
        """Every named block of the file."""
        text = self.path.read_text()
        found: dict[str, str] = {}
        matches = list(_NAME_RE.finditer(text))
        for match, following in zip(matches, [*matches[1:], None], strict=True):
            body = text[match.end() : following.start() if following else len(text)]
            found[match["name"]] = body.strip()
        return found

    def __call__(self, name: str) -> str:
        """The text of one named block."""
        return self.queries[name]


_CORE = QueryFile(_PACKAGE_DIR / "queries.sql")


def queries() -> dict[str, str]:
    """Every named query of the core (``outbox_relay/queries.sql``)."""
    return _CORE.queries


def query(name: str) -> str:
    """The text of one of the core's named queries."""
    return _CORE(name)


def render(template: str, **parts: str) -> str:
    """Fill ``{name}`` placeholders of ``template`` (identifiers, composed fragments).

    Only lower-case names in braces are placeholders, so JSON such as ``'{}'``
    passes through; a placeholder without a part is a programming error. A
    part's leading comment lines are left out.
    """

    def fill(match: re.Match[str]) -> str:
        lines = parts[match["name"]].splitlines()
        while lines and lines[0].lstrip().startswith("--"):
            del lines[0]  # a fragment's own comment stays in its file
        return "\n".join(lines)

    return _PLACEHOLDER_RE.sub(fill, template)


@dataclass(frozen=True)
class Migration:
    """One versioned migration file of one migration set (``target``)."""

    target: str
    version: int
    name: str
    sql: str


def core_migrations_dir(target: str) -> Path:
    """The core's migrations of ``target`` (``service`` or ``primary``)."""
    return _PACKAGE_DIR / "migrations" / target


def migration_set(target: str, directory: Path) -> tuple[Migration, ...]:
    """The migrations in ``directory``, named ``NNNN_name.sql``, in version order."""
    if not directory.is_dir():
        raise MigrationError(f"migrations directory of {target!r} not found: {directory}")
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_RE.match(path.name)
        if match is None:
            raise MigrationError(f"badly named migration file: {path.name} (want NNNN_name.sql)")
        found.append(Migration(target, int(match["version"]), match["name"], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two {target} migrations share a version number")
    return tuple(found)


def migrations(target: str) -> tuple[Migration, ...]:
    """The core's migrations of ``target`` (``service`` or ``primary``)."""
    return migration_set(target, core_migrations_dir(target))
