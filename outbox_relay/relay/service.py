"""The relay service (`run`): sessions, leadership, and the supervised tasks of an active relay.

One relay per service database is active: the one holding the advisory lock on
its listening connection and the lease of the current epoch
(:mod:`~outbox_relay.relay.leadership`). Others stand by and retry the lock
every second. While active, supervised tasks share the work:

* ``relay.lease`` renews the lease on the listening connection (its liveness
  check too) and ends the session when the connection is lost (notifications
  sent meanwhile are gone, so the next session starts with a full sweep) or
  the lease is (then this relay stands by);
* ``relay.listen`` LISTENs on a connection of its own, replacing it (and
  asking for a sweep) when it falls behind a flood of notifications
  (:mod:`~outbox_relay.relay.listener`);
* ``relay.dispatch`` hands rows over (:mod:`~outbox_relay.relay.dispatcher`);
* whatever the command adds to run only while active (the retention loop).

NOTIFY is only a wake-up: every row it would have delivered is also found by
the sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from outbox_relay.db import Pool, connect_retrying, create_pool
from outbox_relay.exceptions import LeadershipLostError
from outbox_relay.lifecycle import stopped_within, supervise
from outbox_relay.logs import describe
from outbox_relay.migrate import check_schema
from outbox_relay.observability.hooks import RelayHooks
from outbox_relay.queue import Queue
from outbox_relay.relay.dispatcher import Dispatcher, RelayStats
from outbox_relay.relay.leadership import LeaderSession
from outbox_relay.relay.listener import Listener
from outbox_relay.relay.store import RelayStore
from outbox_relay.retry import Backoff

logger = logging.getLogger(__name__)

#: Seconds between two attempts of a standby relay to take the lock.
STANDBY_POLL = 1.0

#: Session settings of the active relay's pool. ``synchronous_commit = off``: its
#: commits return without waiting for the WAL flush, which takes one fsync out of
#: every event's path (and the row lock a worker's claim would wait on is released
#: at once). Every write this pool makes may be lost in a server crash without
#: harm: a lost ``mark_queued`` leaves the row ``new`` (swept and handed over
#: again; the queue's dedupe marker keeps it from being scheduled twice), a lost
#: retention DELETE is made again. A worker's commit that read the row behind a
#: lost write cannot survive it either: WAL is flushed in order, and that commit
#: waited for the row lock, so it comes later in the WAL. The lease (the
#: listener's session) and the workers' commits stay durable.
RELAY_POOL_SETTINGS = {"idle_in_transaction_session_timeout": "5000", "synchronous_commit": "off"}

#: Work the command adds to an active relay: called with the relay's pool and its fence (an
#: async check raising LeadershipLostError once the lease is gone: call it before each write), it runs
#: until cancelled (the relay cancels it when its session ends).
ActiveTask = Callable[[Pool, Callable[[], Awaitable[None]]], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class RelayConfig:
    """The relay's settings (the URL is a secret: left out of ``repr``)."""

    database_url: str = field(repr=False)
    queue_name: str
    sweep_interval: float
    requeue_after: float
    batch_size: int
    max_queue_depth: int
    hand_over_interval: float = 0.0


class Relay:
    """The relay service; :meth:`run` returns when ``stop`` is set."""

    def __init__(
        self,
        config: RelayConfig,
        queue: Queue,
        stop: asyncio.Event,
        *,
        while_active: Sequence[tuple[str, ActiveTask]] = (),
        hooks: RelayHooks | None = None,
    ) -> None:
        self.config = config
        self.hooks = hooks or RelayHooks()
        self.queue = queue
        self.stop = stop
        self.stats = RelayStats()
        #: Set while this relay is the active one (for tests and embedding).
        self.active = asyncio.Event()
        self.dispatcher = Dispatcher(
            queue,
            self.stats,
            sweep_interval=config.sweep_interval,
            batch_size=config.batch_size,
            max_queue_depth=config.max_queue_depth,
            stop=stop,
            hooks=self.hooks,
            hand_over_interval=config.hand_over_interval,
        )
        self._while_active = list(while_active)

    async def run(self) -> None:
        """Serve until ``stop`` is set, reconnecting with capped backoff after any failure."""
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                await self._session()
            except Exception as exc:  # any failure ends the session; the next one starts clean
                if self.stop.is_set():
                    break
                leaf = _first_leaf(exc)
                if isinstance(leaf, LeadershipLostError):
                    # Not a failure to back off from: another relay leads now.
                    logger.warning("relay lost its leadership; standing by", extra={"reason": str(leaf)})
                    self.hooks.inactive()
                    continue
                self.hooks.session_ended(describe(leaf))
                delay = backoff.next_delay()
                logger.warning(
                    "relay session ended, reconnecting",
                    extra={"error": describe(leaf), "retry_in": round(delay, 2)},
                )
                await stopped_within(self.stop, delay)
            else:
                backoff.reset()
        logger.info("relay stopped", extra={"handed_over": self.stats.handed_over})

    async def _session(self) -> None:
        """One connection's life: stand by until leading, then serve until it ends or ``stop``."""
        try:
            with self.hooks.waiting("the service database"):
                conn = await connect_retrying(
                    self.config.database_url,
                    what="the service database",
                    application_name="outbox_relay.listener",
                    give_up_after=None,
                    stop=self.stop,
                )
        except asyncio.CancelledError:
            if self.stop.is_set():
                return
            raise
        session = LeaderSession(conn)
        try:
            await check_schema(conn)
            await session.prepare()
            if not await self._await_leadership(session):
                return
            pool = await create_pool(
                self.config.database_url,
                max_size=2,
                application_name="outbox_relay.relay",
                session_settings=RELAY_POOL_SETTINGS,
            )
            dispatcher = self.dispatcher
            listener = Listener(
                self.config.database_url,
                dispatcher.notified,
                dispatcher.missed,
                dispatcher.flooded,
                self.hooks,
            )
            try:
                session.watch()
                await listener.open()  # before the first sweep: no row falls between the two
                self.stats.sessions += 1
                self.dispatcher.restart()
                self.active.set()
                self.hooks.active()
                assert session.epoch is not None
                logger.info("relay active", extra={"queue": self.config.queue_name, "epoch": session.epoch})
                store = RelayStore(
                    pool,
                    batch_size=self.config.batch_size,
                    requeue_after=self.config.requeue_after,
                    epoch=session.epoch,
                )
                tasks: dict[str, Coroutine[Any, Any, None]] = {
                    "relay.lease": session.keep(),
                    "relay.listen": listener.keep(),
                    "relay.dispatch": self.dispatcher.serve(store),
                }
                # Their writes are fenced too: the second argument raises once the lease is gone.
                tasks.update({name: task(pool, store.check_leadership) for name, task in self._while_active})
                await supervise(tasks, self.stop)
            finally:
                listener.close()
                self.active.clear()
                self.hooks.inactive()
                await _close_pool(pool)
        finally:
            await session.close()

    async def _await_leadership(self, session: LeaderSession) -> bool:
        """True once this relay holds the lock; False when ``stop`` came first."""
        announced = False
        while not await session.try_lead():
            self.hooks.standby()
            if not announced:
                logger.info("another relay is active on this database; standing by")
                announced = True
            if await stopped_within(self.stop, STANDBY_POLL):
                return False
        if announced:
            logger.info("the active relay is gone; taking over")
        return True


async def _close_pool(pool: Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), 2.0)
    except Exception:
        pool.terminate()


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


__all__ = ["ActiveTask", "Relay", "RelayStats"]
