"""[0] The physical anchor: the commit rate of single-row outbox inserts with the notify trigger."""

from __future__ import annotations

import asyncio
import time

from bench.servers import Servers
from bench.sql import query, scratch_databases
from outbox_relay.db import Connection, connect
from outbox_relay.devtools.setup import migrate_database
from outbox_relay.domains.reservation import plugin as reservation


async def measure(servers: Servers, tag: str, seconds: float) -> dict[int, float]:
    """Single-row INSERTs into a scratch service outbox (its notify trigger fires; nobody
    listens), each its own commit, for ``seconds`` from 1 and from 4 connections: commits/s."""
    name = f"bench_commits_{tag}"
    out: dict[int, float] = {}
    async with scratch_databases(servers.admin_url, name):
        await migrate_database(servers.url(name), "service", [reservation])
        for producers in (1, 4):
            conns = [await connect(servers.url(name)) for _ in range(producers)]
            start = time.monotonic()
            try:
                counts = await asyncio.gather(
                    *(
                        _insert_until(c, f"anchor-{producers}-{i}", start + seconds)
                        for i, c in enumerate(conns)
                    )
                )
            finally:
                for conn in conns:
                    await conn.close()
            out[producers] = sum(counts) / (time.monotonic() - start)
    return out


async def _insert_until(conn: Connection, prefix: str, deadline: float) -> int:
    """Single-row INSERTs, each its own commit, until ``deadline``; how many."""
    insert = await conn.prepare(query("insert_success_row"))
    count = 0
    while time.monotonic() < deadline:
        await insert.fetch(f"{prefix}-{count}")
        count += 1
    return count
