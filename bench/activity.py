"""Sessions idle in a transaction: :class:`IdleInTransaction` samples ``pg_stat_activity`` meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

from bench.sql import query
from outbox_relay.db import Connection, connect

#: Seconds between two samples.
INTERVAL = 0.1


class IdleInTransaction:
    """While the block runs, the longest any session of ``databases`` (but the backends ``exclude``:
    the bench's own) was seen idle in a transaction (sampled every :data:`INTERVAL` seconds over a
    connection of its own), and which session it was."""

    def __init__(
        self, admin_url: str, databases: list[str], exclude: list[int], interval: float = INTERVAL
    ) -> None:
        self.admin_url = admin_url
        self.databases = databases
        self.exclude = exclude
        self.interval = interval
        self.longest = 0.0
        self.session: dict[str, Any] = {}
        self.samples = 0
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> IdleInTransaction:
        self._conn = await connect(self.admin_url)
        self._task = asyncio.create_task(self._sample(self._conn))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            await self._conn.close()

    async def _sample(self, conn: Connection) -> None:
        statement = await conn.prepare(query("longest_idle_in_transaction"))
        while True:
            row = await statement.fetchrow(self.databases, self.exclude)
            self.samples += 1
            if row is not None and row["seconds"] > self.longest:
                self.longest = float(row["seconds"])
                self.session = {k: row[k] for k in ("application_name", "backend_type", "query")}
            await asyncio.sleep(self.interval)
