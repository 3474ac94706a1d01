"""The active relay's database-backed gauges, refreshed on an interval (never per scrape).

Every query is cheap whatever the table's size: pending counts walk their
partial indexes, the oldest pending age is two index probes, the subscription
figures come from the catalogue and statistics views, and the lag in bytes
(when ``PRIMARY_URL`` is set) is one row of ``pg_replication_slots`` on the primary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from outbox_relay.db import Pool
from outbox_relay.lifecycle import stopped_within
from outbox_relay.logs import describe
from outbox_relay.observability.hooks import RelayHooks
from outbox_relay.observability.metrics import PENDING_STATUSES, Metrics
from outbox_relay.observability.sql import query
from outbox_relay.sql import query as core_query

logger = logging.getLogger(__name__)

#: Seconds between two refreshes.
REFRESH_INTERVAL = 5.0
#: Seconds one refresh query may take.
QUERY_TIMEOUT = 5.0


@dataclass(eq=False)
class GaugeRefresher:
    """Refreshes the gauges of ``metrics`` from the service database (and the primary)."""

    primary_url: str | None
    pool: Pool
    metrics: Metrics
    queue_depth: Callable[[], Awaitable[int]] | None = None
    hooks: RelayHooks | None = None
    #: What to call the queue's server in health reasons (the backend's name).
    server: str = "the queue"
    _primary: Any = field(default=None, init=False, repr=False)
    _slot: str | None = field(default=None, init=False, repr=False)
    _failing_logged: bool = field(default=False, init=False, repr=False)

    async def run(self, stop: asyncio.Event, interval: float = REFRESH_INTERVAL) -> None:
        """Refresh now and every ``interval`` seconds until ``stop``; never raises (but cancels)."""
        try:
            while True:
                await self.refresh_once()
                if await stopped_within(stop, interval):
                    return
        finally:
            self._forget_subscription()  # no longer active: a standby does not report it
            await self._close_primary()

    async def refresh_once(self) -> None:
        """One refresh; a failing part is counted and logged once, the others still run."""
        for part in (self._pending, self._subscription, self._queue, self._slot_lag):
            try:
                await part()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.refresh_errors.inc()
                if not self._failing_logged:
                    logger.warning(
                        "gauge refresh failed", extra={"part": part.__name__, "error": describe(exc)}
                    )
                    self._failing_logged = True
                if part == self._slot_lag:
                    await self._close_primary()

    async def _pending(self) -> None:
        row = await self.pool.fetchrow(query("pending_counts"), timeout=QUERY_TIMEOUT)
        assert row is not None
        for status in PENDING_STATUSES:
            self.metrics.rows.labels(status=status).set(row[status])
        age = await self.pool.fetchval(core_query("oldest_pending_age"), timeout=QUERY_TIMEOUT)
        self.metrics.oldest_pending_age.set(0.0 if age is None else float(age))

    async def _subscription(self) -> None:
        row = await self.pool.fetchrow(query("subscription_health"), timeout=QUERY_TIMEOUT)
        self._forget_subscription()  # then set again at once: no scrape sees the gap
        if row is None:  # the direct shape, or not subscribed yet: no subscription gauge at all
            return
        self._slot = row["slot"]
        name = row["name"]
        self.metrics.subscription_enabled.labels(subscription=name).set(1 if row["enabled"] else 0)
        if row["lag_seconds"] is not None:
            self.metrics.replication_lag_seconds.set(max(0.0, float(row["lag_seconds"])))
        self.metrics.subscription_apply_errors.labels(subscription=name).set(row["apply_errors"])
        self.metrics.subscription_sync_errors.labels(subscription=name).set(row["sync_errors"])

    def _forget_subscription(self) -> None:
        """Expose no subscription gauge (none found, or this relay is no longer active)."""
        self._slot = None
        for gauge in (
            self.metrics.subscription_enabled,
            self.metrics.subscription_apply_errors,
            self.metrics.subscription_sync_errors,
        ):
            gauge.clear()

    async def _queue(self) -> None:
        if self.queue_depth is None:
            return
        try:
            depth = await asyncio.wait_for(self.queue_depth(), QUERY_TIMEOUT)
        except Exception:
            if self.hooks is not None:
                self.hooks.reachable(self.server, False)
            raise
        if self.hooks is not None:
            self.hooks.reachable(self.server, True)
        self.metrics.queue_depth.set(depth)

    async def _slot_lag(self) -> None:
        if self.primary_url is None or self._slot is None:
            return
        if self._primary is None:
            from outbox_relay.db import connect

            self._primary = await asyncio.wait_for(
                connect(self.primary_url, application_name="outbox_relay.gauges"),
                QUERY_TIMEOUT,
            )
        lag = await self._primary.fetchval(query("slot_lag_bytes"), self._slot, timeout=QUERY_TIMEOUT)
        if lag is not None:
            self.metrics.replication_lag_bytes.set(max(0.0, float(lag)))

    async def _close_primary(self) -> None:
        primary, self._primary = self._primary, None
        if primary is not None:
            try:
                await asyncio.wait_for(primary.close(), 2.0)
            except Exception:
                primary.terminate()
