"""The relay (`run`): NOTIFY fast path plus periodic sweep, handing rows to arq.

One relay per service database is active: the one holding the advisory lock on
its listener connection. Others stand by and retry the lock every second.

While active, two supervised tasks share the work:

* ``relay.watch`` pings the listener connection and ends the session when it
  is lost (notifications sent meanwhile are gone, so the next session starts
  with a full sweep);
* ``relay.dispatch`` hands rows over: ids from notifications are looked up by
  primary key in coalesced batches; every SWEEP_INTERVAL (and at once after a
  reconnect, a ``sweep`` notification or a Redis restart) the sweep pages
  through the partial indexes. Each batch is enqueued in one Redis round trip
  (job ids from correlation ids: a known id is not enqueued twice), then moved
  to ``queued`` by one compare-and-set UPDATE.

NOTIFY is only a wake-up: every row it would have delivered is also found by
the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.exceptions import RedisError

from outbox_relay.backoff import Backoff, describe, retry, stopped_within
from outbox_relay.db import Pool, connect_retrying, create_pool
from outbox_relay.jobs import JobQueue, PendingRow
from outbox_relay.listener import Listener
from outbox_relay.migrate import check_schema
from outbox_relay.observability import Health, Metrics
from outbox_relay.observability.hooks import RelayHooks
from outbox_relay.observability.refresh import GaugeRefresher
from outbox_relay.prune import prune_service
from outbox_relay.settings import Settings
from outbox_relay.sweeper import Sweeper

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Notified ids kept in memory at most; past that the relay falls back to a sweep.
MAX_PENDING_IDS = 20_000
#: Seconds between two attempts of a standby relay to take the lock.
STANDBY_POLL = 1.0
#: Liveness check of the listener connection: period and timeout (seconds).
KEEPALIVE_INTERVAL = 2.0
KEEPALIVE_TIMEOUT = 3.0
#: Seconds between two "relay progress" log lines.
REPORT_INTERVAL = 60.0


class _Stopped(Exception):
    """The stop event was set."""


@dataclass
class RelayStats:
    """Counters since start, for logs, tests and the benchmark."""

    sessions: int = 0
    handed_over: int = 0
    enqueued: int = 0
    sweeps: int = 0
    swept: int = 0
    notifications: int = 0
    pruned: int = 0


class Relay:
    """The relay service; :meth:`run` returns when ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        stop: asyncio.Event,
        health: Health | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.hooks = RelayHooks(health, metrics, deadline=max(30.0, 3 * settings.sweep_interval))
        self.database_url = settings.require_database_url()
        self.queue = queue
        self.stop = stop
        self.stats = RelayStats()
        #: Set while this relay is the active one (for tests and embedding).
        self.active = asyncio.Event()
        self._pending: set[int] = set()
        self._sweep_requested = True
        self._wake = asyncio.Event()
        self._depth = 0
        self._redis_run_id: str | None = None

    # -- the service loop -----------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop`` is set, reconnecting with capped backoff after any failure."""
        backoff = Backoff(0.2, 5.0)
        while not self.stop.is_set():
            try:
                await self._session()
            except _Stopped:
                break
            except asyncio.CancelledError:
                if self.stop.is_set():
                    break
                raise
            except Exception as exc:  # any failure ends the session; the next one starts clean
                delay = backoff.next_delay()
                self.hooks.session_ended(describe(_first_leaf(exc)))
                logger.warning(
                    "relay session ended, reconnecting",
                    extra={"error": describe(_first_leaf(exc)), "retry_in": round(delay, 2)},
                )
                await stopped_within(self.stop, delay)
            else:
                backoff.reset()
        logger.info("relay stopped", extra={"handed_over": self.stats.handed_over})

    async def _session(self) -> None:
        with self.hooks.waiting("the service database"):
            conn = await connect_retrying(
                self.database_url,
                what="the service database",
                application_name="outbox_relay.listener",
                give_up_after=None,
                stop=self.stop,
            )
        listener = Listener(conn, self._on_notify)
        try:
            await check_schema(conn)
            await self._await_leadership(listener)
            pool = await create_pool(self.database_url, max_size=2, application_name="outbox_relay.relay")
            try:
                await listener.listen()
                self.stats.sessions += 1
                # Notifications sent while this relay was away are gone: sweep first.
                self._pending.clear()
                self._sweep_requested = True
                self.active.set()
                self.hooks.active()
                logger.info("relay active", extra={"queue": self.settings.queue_name})
                await self._serve(listener, pool)
            finally:
                self.active.clear()
                self.hooks.inactive()
                await _close_pool(pool)
        finally:
            await listener.close()

    async def _await_leadership(self, listener: Listener) -> None:
        announced = False
        while not await listener.try_lead():
            self.hooks.standby()
            if not announced:
                logger.info("another relay is active on this database; standing by")
                announced = True
            if await stopped_within(self.stop, STANDBY_POLL):
                raise _Stopped
        if announced:
            logger.info("the active relay is gone; taking over")

    async def _serve(self, listener: Listener, pool: Pool) -> None:
        sweeper = Sweeper(
            pool, batch_size=self.settings.batch_size, requeue_after=self.settings.requeue_after
        )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(listener.watch(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT), name="relay.watch")
                group.create_task(self._dispatch_loop(sweeper), name="relay.dispatch")
                group.create_task(self._until_stopped(), name="relay.stop")
                group.create_task(self._report_loop(), name="relay.report")
                if self.settings.retention is not None:
                    group.create_task(self._prune_loop(pool), name="relay.prune")
                if self.hooks.metrics is not None:
                    refresher = GaugeRefresher(
                        self.settings, pool, self.hooks.metrics, self.queue.depth, self.hooks
                    )
                    group.create_task(refresher.run(self.stop), name="relay.gauges")
        except* _Stopped:
            raise _Stopped from None

    async def _report_loop(self) -> None:
        """Once a minute, one line with what moved since the last one (nothing when idle)."""
        last = RelayStats(**vars(self.stats))
        while True:
            if await stopped_within(self.stop, REPORT_INTERVAL):
                return
            now = RelayStats(**vars(self.stats))
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
                        "queue_depth": self._depth,
                    },
                )
            last = now

    async def _prune_loop(self, pool: Pool) -> None:
        """With RETENTION set, the active relay prunes finished rows every PRUNE_INTERVAL."""
        assert self.settings.retention is not None
        while True:
            if await stopped_within(self.stop, self.settings.prune_interval):
                return
            deleted = await prune_service(
                pool, older_than=self.settings.retention, batch_size=self.settings.prune_batch_size
            )
            self.stats.pruned += deleted
            if deleted:
                logger.info("pruned finished rows", extra={"rows": deleted})

    async def _until_stopped(self) -> None:
        await self.stop.wait()
        raise _Stopped

    # -- notifications ----------------------------------------------------------

    def _on_notify(self, payload: str) -> None:
        self.stats.notifications += 1
        if payload.isdigit() and len(self._pending) < MAX_PENDING_IDS:
            self._pending.add(int(payload))
        else:
            # Not a row id (`requeue` asks for a sweep this way), or too many
            # waiting: the sweep finds every new row anyway.
            self._sweep_requested = True
        self._wake.set()

    # -- handing rows over --------------------------------------------------------

    async def _dispatch_loop(self, sweeper: Sweeper) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        batch = self.settings.batch_size
        while True:
            _raise_if_cancelling()
            self.hooks.beat()
            if not self._pending and not self._sweep_requested:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_sweep - loop.time()))
            self._wake.clear()
            while self._pending:
                ids = [self._pending.pop() for _ in range(min(batch, len(self._pending)))]
                await self._hand_over(sweeper, await sweeper.new_by_ids(ids), path="notify")
            if self._sweep_requested or loop.time() >= next_sweep:
                self._sweep_requested = False
                await self._sweep(sweeper)
                next_sweep = loop.time() + self.settings.sweep_interval

    async def _sweep(self, sweeper: Sweeper) -> None:
        self.stats.sweeps += 1
        new = 0
        async for rows in sweeper.new_rows():
            await self._hand_over(sweeper, rows)
            new += len(rows)
        self.hooks.swept_unnotified(new)
        run_id = await self._redis(self.queue.server_run_id)
        restarted = self._redis_run_id is not None and run_id != self._redis_run_id
        if restarted:
            logger.warning("Redis restarted (it may have lost jobs): enqueueing every queued row again")
        self._redis_run_id = run_id
        stale = 0
        async for rows in sweeper.stale_queued_rows(everything=restarted):
            await self._hand_over(sweeper, rows)
            stale += len(rows)
        self.stats.swept += new + stale
        if new or stale:
            logger.info("sweep handed rows over", extra={"new": new, "requeued": stale})

    async def _hand_over(self, sweeper: Sweeper, rows: list[PendingRow], path: str = "sweep") -> None:
        if not rows:
            return
        _raise_if_cancelling()
        await self._wait_for_room()

        async def enqueue() -> tuple[int, int]:
            return await self.queue.enqueue(rows)

        added, self._depth = await self._redis(enqueue)
        await sweeper.mark_queued([row.id for row in rows])
        self.stats.handed_over += len(rows)
        self.stats.enqueued += added
        self.hooks.handed_over(path, len(rows))
        self.hooks.queue_depth(self._depth)

    async def _wait_for_room(self) -> None:
        """Backpressure: keep the queue below MAX_QUEUE_DEPTH so a backlog floods nothing."""
        limit = self.settings.max_queue_depth
        if self._depth < limit:
            return
        logger.debug("queue full, waiting", extra={"depth": self._depth})
        while self._depth >= limit // 2:
            self.hooks.beat()
            if await stopped_within(self.stop, 0.05):
                raise _Stopped
            self._depth = await self._redis(self.queue.depth)

    async def _redis(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis operation, retrying forever (one log line per attempt) until ``stop``."""
        try:
            with self.hooks.waiting("Redis"):
                return await retry(
                    operation,
                    what="Redis",
                    logger=logger,
                    give_up_after=None,
                    stop=self.stop,
                    backoff=Backoff(0.1, 5.0),
                    retry_on=(RedisError, OSError, TimeoutError),
                )
        except asyncio.CancelledError:
            if self.stop.is_set():
                raise _Stopped from None
            raise


async def _close_pool(pool: Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), 2.0)
    except Exception:
        pool.terminate()


def _raise_if_cancelling() -> None:
    """Honour a cancellation that was swallowed on the way (on Python 3.11,
    ``asyncio.wait_for`` inside redis-py can eat one): a relay that lost its
    session, and with it the lock, must stop handing rows over at once."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
