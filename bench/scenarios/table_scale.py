"""[5] Table scale: sweep and hot-path query cost with 0 and with many finished rows (and that no
hot-path plan scans the table), and the cost of pruning."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from bench.servers import Servers
from bench.sql import FINISH_ROW, query, scratch_databases
from outbox_relay.db import Connection, connect
from outbox_relay.devtools.setup import migrate_database
from outbox_relay.domains.reservation import plugin as reservation
from outbox_relay.prune import prune_service
from outbox_relay.relay.store import RelayStore
from outbox_relay.sql import query as core_query
from outbox_relay.sql import render

Operation = Callable[[], Awaitable[Any]]


async def measure(servers: Servers, rows: int, tag: str) -> dict[str, Any]:
    """Sweep and hot-path query cost on two scratch service databases, one empty and one
    holding ``rows`` finished rows, measured alternately so that machine noise hits both
    alike; plus the buffers each query touches (a noise-free cost), plans, and pruning."""
    names = {"empty": f"bench_scale_empty_{tag}", "full": f"bench_scale_full_{tag}"}
    async with scratch_databases(servers.admin_url, *names.values()):
        for name in names.values():
            await migrate_database(servers.url(name), "service", [reservation])
        conns = {key: await connect(servers.url(name)) for key, name in names.items()}
        try:
            start = time.monotonic()
            await conns["full"].execute(query("fill_finished_rows"), rows)
            fill_seconds = time.monotonic() - start
            probes = {key: await _probes(conn) for key, conn in conns.items()}
            timings = await _interleaved_costs(conns, probes)
            buffers = {key: await _buffers(conn, probes[key]) for key, conn in conns.items()}
            plans = await _plans(conns["full"])
            prune = await _prune_cost(conns["full"])
        finally:
            for conn in conns.values():
                await conn.close()
    return {
        "finished_rows": rows,
        "fill_seconds": fill_seconds,
        "empty_ms": timings["empty"],
        "full_ms": timings["full"],
        "empty_buffers": buffers["empty"],
        "full_buffers": buffers["full"],
        "hot_path_plans_scan_table": plans,
        "prune": prune,
    }


async def _probes(conn: Connection) -> list[int]:
    """100 new rows to find, look up, claim and finish; the table analysed; their ids."""
    await conn.execute(query("insert_probes"))
    await conn.execute(query("vacuum_outbox"))
    return [r["id"] for r in await conn.fetch(query("probe_ids"))]


class _OneConnection:
    """A one-connection stand-in for a pool (the store uses fetch, fetchval and execute)."""

    def __init__(self, conn: Connection) -> None:
        self.fetch, self.fetchval, self.execute = conn.fetch, conn.fetchval, conn.execute


def _operations(conn: Connection, ids: list[int]) -> dict[str, Operation]:
    """The hot-path operations timed on one database."""
    sweeper = RelayStore(_OneConnection(conn), batch_size=500, requeue_after=60)  # type: ignore[arg-type]

    async def sweep_new() -> None:  # finds the 100 probe rows
        async for _ in sweeper.new_rows():
            pass

    async def sweep_queued() -> None:  # nothing stale: the idle part of every sweep
        async for _ in sweeper.stale_queued_rows():
            pass

    async def claim_finish() -> None:
        async with _rolled_back(conn):
            await conn.fetchrow(core_query("claim_row"), ids[0])
            await conn.execute(FINISH_ROW, ids[0])

    return {
        "sweep_new_100_rows": sweep_new,
        "sweep_queued_idle": sweep_queued,
        "lookup_100_ids": lambda: sweeper.new_by_ids(ids),
        "claim_and_finish": claim_finish,
        "oldest_pending_age": lambda: conn.fetchval(core_query("oldest_pending_age")),
    }


async def _interleaved_costs(
    conns: Mapping[str, Connection], probes: dict[str, list[int]], rounds: int = 200
) -> dict[str, dict[str, float]]:
    """Median milliseconds per operation and database, the databases taking turns."""
    ops = {key: _operations(conn, probes[key]) for key, conn in conns.items()}
    samples: dict[str, dict[str, list[float]]] = {key: {op: [] for op in ops[key]} for key in ops}
    for _ in range(rounds):
        for key in ops:
            for op, run in ops[key].items():
                t = time.perf_counter()
                await run()
                samples[key][op].append((time.perf_counter() - t) * 1000)
    return {key: {op: statistics.median(v) for op, v in per.items()} for key, per in samples.items()}


async def _buffers(conn: Connection, ids: list[int]) -> dict[str, int]:
    """Shared buffers each hot-path query touches (EXPLAIN ANALYZE, BUFFERS): no timing noise."""
    checks = {
        "select_new": (core_query("select_new"), (0, 500)),
        "select_new_by_ids": (core_query("select_new_by_ids"), (ids,)),
        "select_stale_queued": (core_query("select_stale_queued_page"), (datetime.now(UTC), 500, None, 0)),
        "claim_row": (core_query("claim_row"), (ids[0],)),
        "finish_row": (FINISH_ROW, (ids[0],)),
        "oldest_pending_age": (core_query("oldest_pending_age"), ()),
    }
    out: dict[str, int] = {}
    for name, (sql, args) in checks.items():
        async with _rolled_back(conn):
            explain = render(query("explain_buffers"), statement=sql)
            top = json.loads(await conn.fetchval(explain, *args))[0]["Plan"]
            out[name] = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
    return out


@contextlib.asynccontextmanager
async def _rolled_back(conn: Connection) -> AsyncIterator[None]:
    """A transaction that is always rolled back: measure a write, change nothing."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    finally:
        await transaction.rollback()


async def _plans(conn: Connection) -> dict[str, bool]:
    """For each hot-path query: does its plan scan the outbox table sequentially?"""
    checks = {
        "select_new": (core_query("select_new"), (0, 500)),
        "select_new_by_ids": (core_query("select_new_by_ids"), ([1, 2, 3],)),
        "select_stale_queued": (
            core_query("select_stale_queued_page"),
            (datetime(2000, 1, 1, tzinfo=UTC), 500, None, 0),
        ),
        "mark_queued": (core_query("mark_queued"), ([1, 2, 3], 1)),
        "claim_row": (core_query("claim_row"), (1,)),
        "finish_row": (FINISH_ROW, (1,)),
        "oldest_pending_age": (core_query("oldest_pending_age"), ()),
        "failed_rows": (core_query("failed_rows"), (100,)),
    }
    out = {}
    async with conn.transaction():
        for name, (sql, args) in checks.items():
            plan = await conn.fetchval(render(query("explain"), statement=sql), *args)
            out[name] = '"Seq Scan"' in plan and "outbox" in plan
    return out


async def _prune_cost(conn: Connection) -> dict[str, float]:
    """Rows per second pruning deletes the finished rows at."""
    start = time.monotonic()
    deleted = (await prune_service(conn, older_than=3600, batch_size=5000)).deleted
    elapsed = time.monotonic() - start
    return {"rows": float(deleted), "seconds": elapsed, "rows_per_s": deleted / elapsed if elapsed else 0.0}
