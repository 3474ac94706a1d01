"""Versioned schema migrations, applied under an advisory lock; safe to run again."""

from __future__ import annotations

import logging
from typing import Literal

from outbox_relay.db import Connection
from outbox_relay.exceptions import MigrationError
from outbox_relay.sql import Migration, migrations, query

logger = logging.getLogger(__name__)

Target = Literal["service", "primary"]


async def migrate(conn: Connection, target: Target) -> list[Migration]:
    """Apply the pending migrations of ``target`` in one transaction; return those applied.

    Concurrent runs serialise on a transaction-level advisory lock; the second
    finds everything applied and does nothing.
    """
    available = migrations(target)
    async with conn.transaction():
        await conn.execute(query("migrate_lock"))
        await conn.execute(query("create_migrations_table"))
        applied = {r["version"] for r in await conn.fetch(query("applied_migrations"), target)}
        unknown = applied - {m.version for m in available}
        if unknown:
            raise MigrationError(
                f"the {target} database has migrations this version does not know "
                f"({', '.join(map(str, sorted(unknown)))}): it was migrated by a newer outbox_relay"
            )
        pending = [m for m in available if m.version not in applied]
        for migration in pending:
            logger.info(
                "applying migration",
                extra={"target": target, "version": migration.version, "migration": migration.name},
            )
            await conn.execute(migration.sql)
            await conn.execute(query("record_migration"), target, migration.version, migration.name)
    return pending


def latest_version(target: Target) -> int:
    """The highest migration version this code ships for ``target``."""
    return max((m.version for m in migrations(target)), default=0)


async def check_schema(conn: Connection, target: Target = "service") -> None:
    """Raise :class:`MigrationError` unless ``target``'s schema is fully migrated."""
    if not await conn.fetchval(query("migrations_table_exists")):
        raise MigrationError(f"the {target} database has no outbox_relay schema: run `migrate` first")
    current = int(await conn.fetchval(query("schema_version"), target))
    wanted = latest_version(target)
    if current < wanted:
        raise MigrationError(
            f"the {target} schema is at version {current}, this code needs {wanted}: run `migrate`"
        )
