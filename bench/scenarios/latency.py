"""[3] Latency at a fixed offered load (open loop): commit -> finished percentiles."""

from __future__ import annotations

from bench.fleet import Fleet
from bench.ledger import Ledger

KEYS = ("p50", "p95", "p99", "max", "p50_queued", "p99_queued")


async def measure(
    ledger: Ledger, fleet: Fleet, rate: float, seconds: float, producers: int
) -> dict[str, float]:
    """Milliseconds from commit to finished (and to queued) of ``rate`` events/s for ``seconds``."""
    ids = await ledger.reserve(max(1, int(rate * seconds)))
    await ledger.produce(ids, producers=producers, rate=rate)
    await ledger.wait_finished(ids, fleet)
    stats = await ledger.stats(ids)
    return {key: float(stats[key]) if stats[key] is not None else float("nan") for key in KEYS}
