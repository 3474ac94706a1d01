"""Versioned schema migrations, applied under an advisory lock; safe to run again.

A database holds several migration *sets*, each versioned on its own in
``outbox_relay.schema_migrations (target, version)``: the core's ``service``
set (the outbox) or ``primary`` set (the producer table and publication), and
on a service database one set per plugin that brings a schema (the
reservation domain's ``reservation`` set, the ledger).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from outbox_relay.db import Connection
from outbox_relay.exceptions import MigrationError
from outbox_relay.handlers import Plugin
from outbox_relay.sql import Migration, migration_set, migrations, query

logger = logging.getLogger(__name__)

Target = Literal["service", "primary"]


@dataclass(frozen=True)
class MigrationSet:
    """The migrations of one target, in version order."""

    target: str
    migrations: tuple[Migration, ...]

    @property
    def latest(self) -> int:
        """The highest version this code ships for the set."""
        return max((m.version for m in self.migrations), default=0)


def migration_sets(target: Target, plugins: Sequence[Plugin] = ()) -> list[MigrationSet]:
    """The core's set of ``target`` and, on a service database, each plugin's own set."""
    sets = [MigrationSet(target, migrations(target))]
    if target == "service":
        sets += [
            MigrationSet(p.name, migration_set(p.name, p.migrations))
            for p in plugins
            if p.migrations is not None
        ]
    return sets


async def migrate(conn: Connection, target: Target, plugins: Sequence[Plugin] = ()) -> list[Migration]:
    """Apply the pending migrations of ``target`` (and the plugins' sets) in one transaction.

    Concurrent runs serialise on a transaction-level advisory lock; the second
    finds everything applied and does nothing. Returns the migrations applied.
    """
    applied_now: list[Migration] = []
    async with conn.transaction():
        await conn.execute(query("migrate_lock"))
        await conn.execute(query("create_migrations_table"))
        for mset in migration_sets(target, plugins):
            done = {r["version"] for r in await conn.fetch(query("applied_migrations"), mset.target)}
            unknown = done - {m.version for m in mset.migrations}
            if unknown:
                raise MigrationError(
                    f"the {mset.target} schema has migrations this version does not know "
                    f"({', '.join(map(str, sorted(unknown)))}): it was migrated by a newer outbox_relay"
                )
            for migration in (m for m in mset.migrations if m.version not in done):
                logger.info(
                    "applying migration",
                    extra={"target": mset.target, "version": migration.version, "migration": migration.name},
                )
                await conn.execute(migration.sql)
                await conn.execute(query("record_migration"), mset.target, migration.version, migration.name)
                applied_now.append(migration)
    return applied_now


def latest_version(target: Target) -> int:
    """The highest migration version this code ships for the core's ``target``."""
    return migration_sets(target)[0].latest


async def check_schema(conn: Connection, target: Target = "service", plugins: Sequence[Plugin] = ()) -> None:
    """Raise :class:`MigrationError` unless ``target`` (and the plugins' sets) are fully migrated."""
    if not await conn.fetchval(query("migrations_table_exists")):
        raise MigrationError(f"the {target} database has no outbox_relay schema: run `migrate` first")
    for mset in migration_sets(target, plugins):
        current = int(await conn.fetchval(query("schema_version"), mset.target))
        if current < mset.latest:
            raise MigrationError(
                f"the {mset.target} schema is at version {current}, this code needs {mset.latest}: "
                "run `migrate`"
            )
