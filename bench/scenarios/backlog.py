"""[4] Backlog drain: rows committed and replicated while relay and workers are stopped, then
drained; the relay's and the workers' peak memory meanwhile."""

from __future__ import annotations

import asyncio
import time

from bench import BenchError
from bench.fleet import Fleet
from bench.ledger import Ledger
from bench.sql import query
from outbox_relay.db import connect


async def replicated_backlog(ledger: Ledger, rows: int) -> list[str]:
    """``rows`` reservations and their outbox rows, committed on the primary in chunks of
    1,000 and waited for on the service database."""
    ids = await ledger.reserve(rows)
    primary = await connect(ledger.primary_url)
    try:
        for first in range(0, rows, 1000):
            await primary.execute(query("insert_rows"), ids[first : first + 1000])
    finally:
        await primary.close()
    deadline = time.monotonic() + 300
    while await ledger.service.fetchval(query("count_rows"), ids) < rows:
        if time.monotonic() > deadline:
            raise BenchError("the backlog did not replicate in time")
        await asyncio.sleep(0.1)
    return ids


async def measure(ledger: Ledger, fleet: Fleet, rows: int, workers: int) -> dict[str, float]:
    """Seconds from starting relay and ``workers`` workers until the backlog is finished."""
    ids = await replicated_backlog(ledger, rows)
    start = time.monotonic()
    fleet.start(workers)
    relay_peak = worker_peak = 0
    waiting = asyncio.create_task(ledger.wait_finished(ids, fleet))
    while not waiting.done():
        relay_peak = max(relay_peak, fleet.relay_rss())
        worker_peak = max(worker_peak, fleet.worker_rss())
        await asyncio.sleep(0.05)
    await waiting
    elapsed = time.monotonic() - start
    fleet.stop()
    return {
        "rows": float(rows),
        "drain_seconds": elapsed,
        "drain_events_per_s": rows / elapsed,
        "relay_peak_rss_mb": relay_peak / 2**20,
        "worker_peak_rss_mb": worker_peak / 2**20,
    }


async def measure_per_row(ledger: Ledger, fleet: Fleet, rows: int, workers: int) -> dict[str, float]:
    """The same with one row per job (JOB_BATCH_SIZE=1, the shape before batching)."""
    fleet.env["OUTBOX_RELAY_JOB_BATCH_SIZE"] = "1"
    try:
        return await measure(ledger, fleet, rows, workers)
    finally:
        del fleet.env["OUTBOX_RELAY_JOB_BATCH_SIZE"]
