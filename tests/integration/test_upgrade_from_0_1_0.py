"""A service database made by 0.1.0 (one migration set for outbox and ledger) upgrades in place."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from outbox_relay.composition import worker_config
from outbox_relay.db import create_pool, quote_ident
from outbox_relay.domains.reservation import plugin as reservation
from outbox_relay.exceptions import MigrationError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.migrate import check_schema, migrate, migration_sets
from outbox_relay.settings import Settings
from outbox_relay.worker import RowProcessor
from tests.helpers import open_account, produce, reserve
from tests.servers import PgServer

#: Today's (0.1.0) migration files, kept as they shipped.
OLD = Path(__file__).resolve().parent.parent / "fixtures" / "schema_0_1_0"


@pytest.fixture
async def old_service_db(pg_server: PgServer) -> AsyncIterator[str]:
    """A database migrated exactly as 0.1.0's `migrate` left it, with a pending and a finished row."""
    name = f"old_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_server.url("postgres"))
    await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
    conn = await asyncpg.connect(pg_server.url(name))
    try:
        await conn.execute(
            "CREATE SCHEMA outbox_relay; CREATE TABLE outbox_relay.schema_migrations ("
            " target text NOT NULL, version integer NOT NULL, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (target, version))"
        )
        await conn.execute((OLD / "service" / "0001_outbox_and_ledger.sql").read_text())
        await conn.execute(
            "INSERT INTO outbox_relay.schema_migrations (target, version, name)"
            " VALUES ('service', 1, 'outbox_and_ledger')"
        )
        await open_account(conn, "acc", 1_000)
        await reserve(conn, "acc", 100, "before-upgrade")
        await produce(conn, "before-upgrade", "failure")
        yield pg_server.url(name)
    finally:
        await conn.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        await admin.close()


async def test_a_0_1_0_database_upgrades_in_place_and_keeps_its_rows_and_ledger(old_service_db: str) -> None:
    """migrate adopts the ledger as the reservation set, keeps every row, and the old pending row settles."""
    conn = await asyncpg.connect(old_service_db)
    try:
        with pytest.raises(MigrationError, match="schema is at version"):
            await check_schema(conn, "service", [reservation])
        applied = await migrate(conn, "service", [reservation])
        assert [(m.target, m.version) for m in applied] == [
            (m.target, m.version)
            for s in migration_sets("service", [reservation])
            for m in s.migrations
            if not (s.target == "service" and m.version == 1)
        ]
        await check_schema(conn, "service", [reservation])
        assert await migrate(conn, "service", [reservation]) == [], "a second migrate applied something"
        assert await conn.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'") == 900
        assert await conn.fetchval("SELECT count(*) FROM outbox_relay.outbox") == 1

        registry = HandlerRegistry()
        registry.add_plugin(reservation)
        settings = Settings(database_url=old_service_db)
        pool = await create_pool(old_service_db, max_size=2)
        try:
            row_id = await conn.fetchval("SELECT id FROM outbox_relay.outbox")
            outcome = await RowProcessor(worker_config(settings), pool, registry).process(row_id)
        finally:
            await pool.close()
        assert outcome.result == "finished"
        assert await conn.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'") == 1_000
    finally:
        await conn.close()


async def test_a_fresh_database_gets_outbox_and_ledger_from_their_own_sets(old_service_db: str) -> None:
    """On a new database the core set makes the outbox and the reservation set makes the ledger."""
    conn = await asyncpg.connect(old_service_db)
    try:
        await conn.execute("DROP SCHEMA outbox_relay CASCADE; DROP SCHEMA ledger CASCADE")
        applied = await migrate(conn, "service", [reservation])
        assert {m.target for m in applied} == {"service", "reservation"}
        core_only = await migrate(conn, "service")
        assert core_only == []
        rows = await conn.fetch("SELECT DISTINCT target FROM outbox_relay.schema_migrations")
        assert {r["target"] for r in rows} == {"service", "reservation"}
        assert await conn.fetchval("SELECT to_regclass('ledger.reservations') IS NOT NULL")
    finally:
        await conn.close()
