"""[2] End-to-end throughput: rows committed on the primary as fast as producers can, until all
are finished on the service database; the CPU it cost; [8] idle CPU afterwards."""

from __future__ import annotations

import asyncio

from bench.fleet import Fleet
from bench.ledger import Ledger
from bench.servers import Servers

CpuSeconds = dict[str, float | None]


async def measure(ledger: Ledger, fleet: Fleet, events: int, producers: int) -> float:
    """Events per second from the first commit to the last ``finished_at``."""
    ids = await ledger.reserve(events)
    await ledger.produce(ids, producers=producers)
    await ledger.wait_finished(ids, fleet)
    stats = await ledger.stats(ids)
    return float(stats["n"] / stats["span"])


def cpu_seconds(fleet: Fleet, servers: Servers) -> CpuSeconds:
    """CPU seconds so far of relay, workers, PostgreSQL and Redis."""
    return {**fleet.cpu_seconds(), **servers.cpu_seconds()}


def per_1000(before: CpuSeconds, after: CpuSeconds, events: int) -> CpuSeconds:
    """CPU seconds per 1,000 events of each process between two :func:`cpu_seconds`."""
    out: CpuSeconds = {}
    for key, value in after.items():
        start = before.get(key)
        out[key] = None if start is None or value is None else (value - start) * 1000 / events
    return out


async def idle_cpu(fleet: Fleet, seconds: float) -> dict[str, float]:
    """Percent of a core the relay and the busiest worker use over ``seconds`` with nothing to do."""
    idle = await asyncio.to_thread(fleet.idle_cpu, seconds)
    workers = [v for k, v in idle.items() if k != "relay"]
    return {"relay": idle.get("relay", 0.0), "worker (max)": max(workers, default=0.0)}
