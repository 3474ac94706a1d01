"""Schema migrations: idempotent, safe under concurrency, refusing unknown or missing schemas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from outbox_relay.db import quote_ident
from outbox_relay.exceptions import MigrationError
from outbox_relay.migrate import Target, check_schema, latest_version, migrate
from outbox_relay.sql import migrations
from tests.servers import PgServer


@pytest.fixture
async def fresh_db(pg_server: PgServer) -> AsyncIterator[str]:
    """The URL of a new, empty database; dropped after the test."""
    name = f"mig_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_server.url("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
        yield pg_server.url(name)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        await admin.close()


TARGETS: list[Target] = ["service", "primary"]


@pytest.mark.parametrize("target", TARGETS)
async def test_migrate_twice_applies_everything_once_and_then_nothing(fresh_db: str, target: Target) -> None:
    """The first migrate applies every migration; a second one applies none and changes nothing."""
    conn = await asyncpg.connect(fresh_db)
    try:
        first = await migrate(conn, target)
        assert [m.version for m in first] == [m.version for m in migrations(target)]
        assert first, "no migration shipped"
        recorded = await _recorded(conn, target)
        tables = await _tables(conn)

        assert await migrate(conn, target) == []
        assert await _recorded(conn, target) == recorded
        assert await _tables(conn) == tables
        await check_schema(conn, target)
    finally:
        await conn.close()


@pytest.mark.parametrize("target", TARGETS)
async def test_concurrent_migrations_on_a_fresh_database_both_succeed_and_apply_each_version_once(
    fresh_db: str, target: Target
) -> None:
    """Two migrate calls racing on a fresh database both succeed; each version is applied exactly once."""
    first, second = await asyncpg.connect(fresh_db), await asyncpg.connect(fresh_db)
    try:
        applied = await asyncio.gather(migrate(first, target), migrate(second, target))
        versions = sorted(m.version for result in applied for m in result)
        assert versions == [m.version for m in migrations(target)]
        assert sorted(len(result) for result in applied)[0] == 0, "both runs applied migrations"
        assert [v for v, _ in await _recorded(first, target)] == versions
        await check_schema(first, target)
    finally:
        await first.close()
        await second.close()


async def test_check_schema_refuses_an_unmigrated_database(fresh_db: str) -> None:
    """check_schema raises MigrationError on a database that was never migrated."""
    conn = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(MigrationError, match="migrate"):
            await check_schema(conn, "service")
    finally:
        await conn.close()


async def test_check_schema_refuses_a_database_behind_this_code(fresh_db: str) -> None:
    """check_schema raises MigrationError when the database records an older version than this code needs."""
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn, "primary")  # the bookkeeping table exists, but nothing for "service"
        with pytest.raises(MigrationError, match=f"needs {latest_version('service')}"):
            await check_schema(conn, "service")
    finally:
        await conn.close()


@pytest.mark.parametrize("target", TARGETS)
async def test_migrate_refuses_a_database_with_a_version_this_code_does_not_know(
    fresh_db: str, target: Target
) -> None:
    """A database that records a migration newer than this code makes migrate raise MigrationError."""
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn, target)
        future = latest_version(target) + 1000
        await conn.execute(
            "INSERT INTO outbox_relay.schema_migrations (target, version, name)"
            " VALUES ($1, $2, 'from_the_future')",
            target,
            future,
        )
        with pytest.raises(MigrationError, match=str(future)):
            await migrate(conn, target)
        assert future in {v for v, _ in await _recorded(conn, target)}
    finally:
        await conn.close()


async def test_service_triggers_are_enabled_as_documented(service: Any) -> None:
    """outbox_notify fires always (also for replicated rows), outbox_skip_known only for replicated rows;
    the sinks' set (applied by every `migrate`) forgets pruned rows' deliveries."""
    enabled = dict(
        await service.fetch(
            "SELECT tgname, tgenabled::text FROM pg_trigger"
            " WHERE tgrelid = 'outbox_relay.outbox'::regclass AND NOT tgisinternal"
        )
    )
    assert enabled == {"outbox_notify": "A", "outbox_skip_known": "R", "outbox_sinks_forget_pruned": "O"}


async def test_primary_publication_publishes_inserts_only(primary: Any) -> None:
    """The primary's publication replicates the outbox table's inserts and nothing else."""
    publication = await primary.fetchrow(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication"
        " WHERE pubname = 'outbox_relay'"
    )
    assert tuple(publication) == (True, False, False, False)
    tables = await primary.fetch(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = 'outbox_relay'"
    )
    assert [tuple(t) for t in tables] == [("outbox_relay", "outbox")]


async def _recorded(conn: Any, target: str) -> list[tuple[int, str]]:
    rows = await conn.fetch(
        "SELECT version, name FROM outbox_relay.schema_migrations WHERE target = $1 ORDER BY version", target
    )
    return [(r["version"], r["name"]) for r in rows]


async def _tables(conn: Any) -> list[str]:
    rows = await conn.fetch(
        "SELECT schemaname || '.' || tablename AS t FROM pg_tables"
        " WHERE schemaname IN ('outbox_relay', 'ledger') ORDER BY 1"
    )
    return [r["t"] for r in rows]
