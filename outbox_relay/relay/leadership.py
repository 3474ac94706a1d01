"""Leadership and the listening session: the relay's dedicated connection.

It holds the leadership lock, LISTENs, and checks its own liveness.

It is never pooled (a pool runs ``UNLISTEN *`` on release) and it holds the
session advisory lock that makes its relay the active one: when the session
ends, for whatever reason, the lock is released and a standby can take over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from outbox_relay.db import DirectConnection
from outbox_relay.exceptions import ConnectionLostError
from outbox_relay.sql import query

logger = logging.getLogger(__name__)

#: The NOTIFY channel the outbox trigger sends on.
CHANNEL = "outbox_relay"


class LeaderSession:
    """Wraps the dedicated connection; ``on_notify`` gets each payload, synchronously."""

    def __init__(self, conn: DirectConnection, on_notify: Callable[[str], None]) -> None:
        self.conn = conn
        self._on_notify = on_notify
        self._lost = asyncio.Event()

    async def try_lead(self) -> bool:
        """Try to take the relay lock of this database; True when this relay is now active."""
        return bool(await self.conn.fetchval(query("try_relay_lock")))

    async def listen(self) -> None:
        """LISTEN on the outbox channel; watch for the connection's end."""
        self.conn.add_termination_listener(self._terminated)
        await self.conn.add_listener(CHANNEL, self._notified)

    async def watch(self, interval: float, timeout: float) -> None:
        """Return never: raise :class:`ConnectionLostError` once the connection is gone.

        asyncpg sets no TCP keepalive, so a half-open connection is only noticed
        by a query with a timeout: ping every ``interval`` seconds.
        """
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), interval)
            except TimeoutError:
                pass
            else:
                raise ConnectionLostError("listener connection terminated")
            try:
                await self.conn.fetchval("SELECT 1", timeout=timeout)
            except Exception as exc:
                raise ConnectionLostError(f"listener connection check failed: {exc!r}") from exc

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        # A plain callback (not a coroutine): asyncpg would run an async one as a
        # task nobody holds.
        self._on_notify(str(payload))

    def _terminated(self, _conn: Any) -> None:
        self._lost.set()

    async def close(self) -> None:
        """Close the connection (releasing the lock); never raises."""
        try:
            await asyncio.wait_for(self.conn.close(), 2.0)
        except Exception:
            self.conn.terminate()
