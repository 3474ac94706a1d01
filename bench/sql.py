"""The bench's SQL (``bench/queries.sql``) and the core's, and scratch databases made and dropped."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from outbox_relay.db import connect, quote_ident
from outbox_relay.sql import QueryFile, render
from outbox_relay.sql import query as core_query

#: The bench's own named queries.
query = QueryFile(Path(__file__).resolve().parent / "queries.sql")

#: The worker's finishing statement, as the worker renders it.
FINISH_ROW = render(core_query("finish_row"), finished_columns=core_query("finished_columns"))


async def create_databases(admin_url: str, *names: str) -> None:
    """CREATE DATABASE each of ``names`` (over the server's ``postgres`` database)."""
    await _each_database(admin_url, "create_database", names)


async def drop_databases(admin_url: str, *names: str) -> None:
    """DROP DATABASE each of ``names`` if it exists, its sessions ended (FORCE)."""
    await _each_database(admin_url, "drop_database", names)


async def _each_database(admin_url: str, statement: str, names: tuple[str, ...]) -> None:
    admin = await connect(admin_url)
    try:
        for name in names:
            await admin.execute(render(query(statement), database=quote_ident(name)))
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def scratch_databases(admin_url: str, *names: str) -> AsyncIterator[None]:
    """Databases that exist for the block only."""
    await create_databases(admin_url, *names)
    try:
        yield
    finally:
        await drop_databases(admin_url, *names)
