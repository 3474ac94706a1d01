"""The bench's workload: reservations to settle, and producers that commit their outcomes on the primary."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import BenchError
from bench.fleet import Fleet
from bench.sql import query
from outbox_relay.db import Connection, connect
from outbox_relay.settings import Settings


class Ledger:
    """Reservations to settle, and producers that commit their outcomes on the primary."""

    def __init__(self, settings: Settings, accounts: int = 1) -> None:
        self.settings = settings
        self.accounts = accounts
        self._service: Connection | None = None
        self.primary_url = settings.require_primary_url()
        self._next = 0

    @property
    def service(self) -> Connection:
        """The connection to the service database (after :meth:`open`)."""
        assert self._service is not None, "Ledger.open() first"
        return self._service

    async def open(self) -> None:
        """Connect to the service database and open the accounts."""
        self._service = await connect(self.settings.require_database_url())
        await self._service.execute(query("open_accounts"), self.accounts)

    async def close(self) -> None:
        """Close the connection."""
        if self._service is not None:
            await self._service.close()

    async def reserve(self, count: int) -> list[str]:
        """``count`` fresh reservations (made in bulk, balance adjusted to match)."""
        first = self._next
        self._next += count
        ids = [f"bench-{i:08d}" for i in range(first, first + count)]
        async with self.service.transaction():
            await self.service.execute(query("reserve"), ids, self.accounts)
            await self.service.execute(query("charge_reservations"), ids)
        return ids

    async def warm_up(self, fleet: Fleet) -> None:
        """Push events through until relay and every worker answer (start-up is not measured)."""
        ids = await self.reserve(20)
        await self.produce(ids, producers=1)
        await self.wait_finished(ids, fleet, timeout=60)

    async def produce(self, ids: list[str], *, producers: int, rate: float = 0.0) -> None:
        """Commit one outbox row per id on the primary, each its own transaction; ``rate`` per
        second all together if given (open loop), else as fast as ``producers`` connections go."""
        queue = list(reversed(ids))
        start = time.monotonic()
        interval = 1.0 / rate if rate else 0.0
        sent = 0

        async def producer() -> None:
            nonlocal sent
            conn = await connect(self.primary_url)
            try:
                insert = await conn.prepare(query("insert_row"))
                while queue:
                    cid = queue.pop()
                    if interval:
                        due = start + sent * interval
                        sent += 1
                        if (delay := due - time.monotonic()) > 0:
                            await asyncio.sleep(delay)
                    await insert.fetch(cid, "success" if hash(cid) % 5 else "failure")
            finally:
                await conn.close()

        await asyncio.gather(*(producer() for _ in range(producers)))

    async def wait_finished(self, ids: list[str], fleet: Fleet | None, timeout: float = 600) -> None:
        """Wait until every row of ``ids`` ended (finished or failed) on the service database."""
        deadline = time.monotonic() + timeout
        while True:
            done = await self.service.fetchval(query("count_ended"), ids)
            if done >= len(ids):
                return
            if fleet is not None:
                fleet.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"only {done} of {len(ids)} events finished in time")
            await asyncio.sleep(0.02)

    async def stats(self, ids: list[str]) -> Any:
        """Count, span and latency percentiles (commit to finished, to queued) of ``ids``."""
        return await self.service.fetchrow(query("latency_stats"), ids)
