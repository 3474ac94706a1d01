"""The active relay's listening connection: LISTEN on the outbox channel, apart from the lease's.

Any login with CONNECT can NOTIFY on the channel, as fast as it likes, and the
server delivers a listener's notifications in order: a forger sending faster
than the relay reads (a hundred thousand a second, in batches) builds a
backlog that every real notification waits behind. Two things keep that from
hurting:

* the listener has a connection of its own, so a backlog never delays the
  lease's renewal (on :class:`~outbox_relay.relay.leadership.LeaderSession`'s
  connection, which does not LISTEN): a flood cannot end the session;
* past :data:`FLOOD_LIMIT` notifications naming no row within a second, the
  listener closes its connection (which discards the backlog the server had
  not sent yet) and listens again only :data:`FLOOD_HOLD` seconds later; the
  dispatcher meanwhile sweeps the new rows every ``FLOOD_SWEEP_INTERVAL``
  (10 ms: one scan of a partial index), which finds every row the lost
  notifications named. A flood costs the relay little more than those sweeps,
  whatever its rate;
* the listener pings its connection every :data:`PING_INTERVAL`; a ping not
  answered within :data:`LAG_LIMIT` means the connection is that far behind
  (or gone): it is replaced the same way, at once.

The connection runs with ``idle_session_timeout`` like the lease's, so the
server ends it when a frozen relay stops pinging: a listener that reads
nothing would otherwise hold the server's notification queue back until
NOTIFY fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from outbox_relay.db import DirectConnection, connect
from outbox_relay.exceptions import ConnectionLostError
from outbox_relay.observability.hooks import RelayHooks
from outbox_relay.relay.leadership import CHANNEL, IDLE_SESSION_TIMEOUT_MS
from outbox_relay.sql import query

logger = logging.getLogger(__name__)

#: Seconds between two pings of the listening connection.
PING_INTERVAL = 0.5
#: Seconds a ping may take before the connection is taken to be behind (a flood) or lost.
LAG_LIMIT = 1.0
#: Notifications naming no row within one second past which the listener stops listening for
#: FLOOD_HOLD seconds, while the dispatcher sweeps every FLOOD_SWEEP_INTERVAL. No deployment
#: sends any (only the trigger's ids and `requeue`'s ``sweep``), so a low limit costs nothing; a
#: high one would let a fast forger build a backlog first.
FLOOD_LIMIT = 1_000
FLOOD_HOLD = 2.0
#: The listening connection's application_name (the lease's is ``outbox_relay.listener``).
APPLICATION_NAME = "outbox_relay.notify"


class Listener:
    """LISTENs for the active relay: ``on_notify`` gets each payload (synchronously), ``on_reset``
    is called after each replacement connection (notifications sent meanwhile are gone)."""

    def __init__(
        self,
        url: str,
        on_notify: Callable[[str], bool],
        on_reset: Callable[[], None],
        on_flood: Callable[[float], None],
        hooks: RelayHooks | None = None,
    ) -> None:
        self.url = url
        self._on_notify = on_notify
        self._on_reset = on_reset
        self._on_flood = on_flood
        self.hooks = hooks or RelayHooks()
        self._conn: DirectConnection | None = None
        self._window_start = 0.0
        self._window_dropped = 0
        self._flood_seen = False
        #: Connections dropped because they fell behind (for tests and the benchmark).
        self.resets = 0

    async def open(self) -> None:
        """Connect and LISTEN. Raises :class:`ConnectionLostError` when the database is away."""
        try:
            conn = await connect(self.url, application_name=APPLICATION_NAME)
            try:
                if conn.get_server_version().major >= 14:
                    await conn.execute(f"SET idle_session_timeout = {IDLE_SESSION_TIMEOUT_MS}")
                await conn.add_listener(CHANNEL, self._notified)
            except BaseException:
                conn.terminate()
                raise
        except Exception as exc:
            raise ConnectionLostError(f"cannot open the notification listener: {exc!r}") from exc
        self._conn = conn

    async def keep(self) -> None:
        """Return never: watch the connection :meth:`open` made, replacing it (and calling
        ``on_reset``) when it falls behind or is lost. Raises :class:`ConnectionLostError` when
        a replacement cannot be opened (the database is away: the session ends)."""
        while True:
            assert self._conn is not None, "open() first"
            why = await self._watch(self._conn)
            self.close()
            self._window_start, self._window_dropped = time.monotonic(), 0
            if why == "lost":
                logger.warning("the notification listener's connection was lost; listening again")
            else:
                self.resets += 1
                self.hooks.listener_reset()
                hold = FLOOD_HOLD if why == "flood" else 0.0
                logger.warning(
                    "notification flood: the listener dropped its backlog and listens again in %s s;"
                    " sweeps hand the rows over meanwhile",
                    hold,
                    extra={"why": why, "resets": self.resets},
                )
                self._on_flood(hold)
                await asyncio.sleep(hold)
            await self.open()
            self._on_reset()

    def close(self) -> None:
        """Drop the connection at once (a backlog is discarded, not read); never raises."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _watch(self, conn: DirectConnection) -> str:
        """Ping ``conn`` until it is ``lost``, ``behind`` (a ping took longer than LAG_LIMIT) or
        closed by :meth:`_notified` for a ``flood``."""
        self._flood_seen = False
        ended = asyncio.Event()
        conn.add_termination_listener(lambda _conn: ended.set())
        while True:
            try:
                await asyncio.wait_for(ended.wait(), PING_INTERVAL)
            except TimeoutError:
                pass
            else:
                return "flood" if self._flood_seen else "lost"
            try:
                await conn.fetchval(query("listener_ping"), timeout=LAG_LIMIT)
            except TimeoutError:
                return "flood" if self._flood_seen else "behind"
            except Exception:
                return "flood" if self._flood_seen else "lost"

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        # A plain callback (not a coroutine): asyncpg would run an async one as a
        # task nobody holds.
        if self._on_notify(str(payload)):
            return
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_dropped = now, 0
        self._window_dropped += 1
        if self._window_dropped > FLOOD_LIMIT and self._conn is not None:
            # Close at once (here, not in keep(): it may be waiting on a ping stuck behind the backlog).
            self._flood_seen = True
            self.close()
