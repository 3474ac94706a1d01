"""[6] Worker scaling without producers: a replicated backlog drained by a warm fleet, the relay
started last; the rate between the first and the last ``finished_at`` and the cores busy."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import psutil

from bench.fleet import Fleet
from bench.ledger import Ledger
from bench.scenarios.backlog import replicated_backlog
from bench.sql import query

#: (wall-clock time, psutil.cpu_times()) samples of the whole machine.
Samples = list[tuple[float, Any]]


async def drain(ledger: Ledger, fleet: Fleet, rows: int) -> tuple[float, float]:
    """Rows per second the running (warm) fleet's workers finish a replicated backlog at, and
    how many of the machine's cores were busy meanwhile: the relay is stopped while the
    backlog replicates and started again last, and both figures are taken between the first
    and the last ``finished_at`` (no process start-up in them, no producers). Stops the fleet."""
    fleet.stop_relay()
    ids = await replicated_backlog(ledger, rows)
    samples: Samples = []
    sampler = asyncio.create_task(_sample_cpu(samples), name="bench.cpu_sampler")
    try:
        fleet.start(0)
        await ledger.wait_finished(ids, fleet)
        await asyncio.sleep(0.06)  # one sample past the last finish
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    span = await ledger.service.fetchrow(query("finished_span"), ids)
    fleet.stop()
    assert span is not None
    first, last = float(span["first"]), float(span["last"])
    return rows / max(last - first, 1e-3), cores_busy(samples, first, last)


async def _sample_cpu(samples: Samples) -> None:
    while True:
        samples.append((time.time(), psutil.cpu_times()))
        await asyncio.sleep(0.05)


def _cpu_total(times: Any) -> float:
    """All of a ``psutil.cpu_times()``; Linux counts guest time inside user time already."""
    return float(sum(times)) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def cores_busy(samples: Samples, first: float, last: float) -> float:
    """Cores busy (all processes of the machine) between the samples around ``first`` and ``last``."""
    before = [s for s in samples if s[0] <= first] or samples[:1]
    after = [s for s in samples if s[0] >= last] or samples[-1:]
    return busy(before[-1][1], after[0][1])


def busy(c0: Any, c1: Any) -> float:
    """Cores busy (all processes of the machine) between two ``psutil.cpu_times()``."""
    idle = float(c1.idle - c0.idle) + (getattr(c1, "iowait", 0.0) - getattr(c0, "iowait", 0.0))
    total = _cpu_total(c1) - _cpu_total(c0)
    if total <= 0:
        return float("nan")
    return (1 - idle / total) * (psutil.cpu_count() or 1)
