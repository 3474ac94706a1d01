"""Leadership and the listening session: the relay's dedicated connection.

It holds the leadership lock and the lease, and checks its own liveness; the
active relay LISTENs on a connection of its own (:mod:`~outbox_relay.relay.listener`),
so that no flood of notifications can delay a renewal.

It is never pooled. Leadership is two things, both kept by this connection:

* the **leadership lock**, a session advisory lock: one active relay per
  service database whatever its queue name; released the moment the session
  ends (a crash, a closed connection), so a standby takes over within a second;
* the **lease** (``outbox_relay.relay_lease``): taken with the lock under a new
  *epoch*, renewed every :data:`RENEW_INTERVAL` seconds for :data:`LEASE_TTL`.
  Every write of the relay names its epoch and acts only while the lease is
  unexpired and of that epoch (checked in the same statement), so a relay that
  lost its leadership without knowing it changes nothing.

A frozen relay (SIGSTOP, a hung host) keeps its TCP connections open, so the
server itself must end its session: the connection runs with
``idle_session_timeout`` = :data:`IDLE_SESSION_TIMEOUT` (PostgreSQL 14 and
later), well above the renewal period, so the server closes a session that
stopped renewing and the lock goes with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any

from outbox_relay.db import DirectConnection
from outbox_relay.exceptions import ConnectionLostError, LeadershipLostError
from outbox_relay.sql import query

logger = logging.getLogger(__name__)

#: The NOTIFY channel the outbox trigger sends on.
CHANNEL = "outbox_relay"
#: Seconds a lease lasts from its last renewal; the relay's writes act only within it.
LEASE_TTL = 10.0
#: Seconds between two renewals (also the listening connection's liveness check).
RENEW_INTERVAL = 2.0
#: Seconds a renewal may take before the connection is taken for lost.
RENEW_TIMEOUT = 3.0
#: The server ends the listening session after this long without a statement:
#: a frozen relay's lock is released within it (milliseconds, for the server).
IDLE_SESSION_TIMEOUT_MS = 8_000
#: The worst case from the active relay freezing to a standby being active:
#: its last statement, then the idle timeout, then the standby's next try
#: (one second apart) and its session start.
WORST_CASE_TAKEOVER = IDLE_SESSION_TIMEOUT_MS / 1000 + 1.0 + 2.0


def holder_name() -> str:
    """A name for one relay session, unique everywhere (shown in the lease row)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class LeaderSession:
    """Wraps the dedicated connection of the lock and the lease."""

    def __init__(self, conn: DirectConnection) -> None:
        self.conn = conn
        self._lost = asyncio.Event()
        self.holder = holder_name()
        #: The lease's epoch while this session leads (the fencing token of its writes).
        self.epoch: int | None = None

    async def prepare(self) -> None:
        """Have the server end this session when it goes quiet (a frozen process)."""
        if self.conn.get_server_version().major >= 14:
            await self.conn.execute(f"SET idle_session_timeout = {IDLE_SESSION_TIMEOUT_MS}")
        await self.conn.execute("SET idle_in_transaction_session_timeout = 5000")

    async def try_lead(self) -> bool:
        """Try to take the relay lock of this database, then the lease under a new epoch.

        True when this relay is now active. Holding the lock proves that no
        other relay's listening session is alive, so the lease is taken
        whatever its expiry: writes of any earlier epoch change nothing from now on.
        """
        if not await self.conn.fetchval(query("try_relay_lock")):
            return False
        self.epoch = int(await self.conn.fetchval(query("take_lease"), self.holder, LEASE_TTL))
        return True

    def watch(self) -> None:
        """Watch for the connection's end (:meth:`keep` raises then)."""
        self.conn.add_termination_listener(self._terminated)

    async def keep(self, interval: float = RENEW_INTERVAL, timeout: float = RENEW_TIMEOUT) -> None:
        """Return never: renew the lease every ``interval`` seconds.

        Raises :class:`LeadershipLostError` when the lease has expired or another
        epoch holds it, :class:`ConnectionLostError` once the connection is gone
        (asyncpg sets no TCP keepalive, so a half-open connection is only noticed
        by a query with a timeout: the renewal is that query).
        """
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), interval)
            except TimeoutError:
                pass
            else:
                raise ConnectionLostError("listener connection terminated")
            try:
                renewed = await self.conn.fetchval(
                    query("renew_lease"), self.holder, self.epoch, LEASE_TTL, timeout=timeout
                )
            except Exception as exc:
                raise ConnectionLostError(f"listener connection check failed: {exc!r}") from exc
            if not renewed:
                raise LeadershipLostError(
                    f"the lease of epoch {self.epoch} expired or was taken over by another relay"
                )

    def _terminated(self, _conn: Any) -> None:
        self._lost.set()

    async def close(self) -> None:
        """Close the connection (releasing the lock); never raises."""
        try:
            await asyncio.wait_for(self.conn.close(), 2.0)
        except Exception:
            self.conn.terminate()
