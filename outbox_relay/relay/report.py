"""The relay's progress line: once a minute, what moved since the last one (nothing when idle)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from outbox_relay.lifecycle import stopped_within
from outbox_relay.relay.dispatcher import RelayStats

logger = logging.getLogger(__name__)

#: Seconds between two "relay progress" log lines.
REPORT_INTERVAL = 60.0


async def report_progress(
    stats: RelayStats, queue_depth: Callable[[], int], stop: asyncio.Event, interval: float | None = None
) -> None:
    """Log one line per ``interval`` with the counters' increments, until ``stop``."""
    last = RelayStats(**vars(stats))
    while not await stopped_within(stop, REPORT_INTERVAL if interval is None else interval):
        now = RelayStats(**vars(stats))
        moved = {key: value - getattr(last, key) for key, value in vars(now).items()}
        if moved["handed_over"] or moved["pruned"]:
            logger.info(
                "relay progress",
                extra={
                    "handed_over": moved["handed_over"],
                    "enqueued": moved["enqueued"],
                    "by_sweep": moved["swept"],
                    "notifications": moved["notifications"],
                    "pruned": moved["pruned"],
                    "queue_depth": queue_depth(),
                },
            )
        last = now
