"""The dispatcher: hands pending rows to the queue, from notifications and from sweeps.

Ids from notifications are looked up by primary key in coalesced batches;
every SWEEP_INTERVAL (and at once after a reconnect, a ``sweep`` notification
or a change of the queue's epoch) the sweep pages through the partial indexes.
Each batch is handed over in one queue round trip (a known row is not added
twice; the queue packs the rows into batch jobs; a relay's first sweep hands
every ``queued`` row over again, as a change of epoch does), then moved to ``queued`` by
one compare-and-set UPDATE. Notified rows are handed over at once after a
quiet spell, and at most every HAND_OVER_INTERVAL under a steady stream (every
BEHIND_FACTOR of them while the workers are behind: the last hand-over found
due jobs no worker had taken), so that the rows arriving meanwhile travel
together (the batch size adapts to the load: one row at low load, many under
a backlog).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import outbox_relay.relay.notifications as notifications
from outbox_relay.exceptions import QueueError, QueueUnavailable
from outbox_relay.lifecycle import raise_if_cancelling, stopped_within
from outbox_relay.observability.hooks import RelayHooks
from outbox_relay.queue import HandOver, Queue
from outbox_relay.relay.store import PendingRow
from outbox_relay.retry import Backoff, retry

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Notified ids kept in memory at most; past that the relay stops collecting ids (it counts
#: each one it leaves, ``reason="pending_full"``) and falls back to a sweep.
MAX_PENDING_IDS = 20_000
#: The ``reason`` label of dropped notifications: a payload that is no row id (nor ``sweep``) ...
NOT_A_ROW_ID = "not_a_row_id"
#: ... and a row id arriving while MAX_PENDING_IDS are waiting.
PENDING_FULL = "pending_full"
#: Seconds between two sweeps of the new rows (one index scan of the partial index) while the
#: listener does not listen (a flood of notifications naming no row: see relay/listener.py).
FLOOD_SWEEP_INTERVAL = 0.01
#: Seconds between two looks at the queue's depth while it is full.
FULL_QUEUE_POLL = 0.05
#: While the workers are behind (the last hand-over found due jobs no worker had
#: taken), hand-overs of notified rows are this many HAND_OVER_INTERVALs apart.
BEHIND_FACTOR = 4


class Store(Protocol):
    """What the dispatcher reads and writes (:class:`~outbox_relay.relay.store.RelayStore`)."""

    def new_rows(self) -> AsyncIterator[list[PendingRow]]: ...
    def stale_queued_rows(self, *, everything: bool = False) -> AsyncIterator[list[PendingRow]]: ...
    async def new_by_ids(self, ids: Sequence[int]) -> list[PendingRow]: ...
    async def mark_queued(self, ids: Sequence[int]) -> None: ...


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

    def count_pruned(self, rows: int) -> None:
        """Add rows deleted by the relay's retention loop."""
        self.pruned += rows


class Dispatcher:
    """Hands rows over; one per relay, living across sessions (it keeps the queue's epoch)."""

    def __init__(
        self,
        queue: Queue,
        stats: RelayStats,
        *,
        sweep_interval: float,
        batch_size: int,
        max_queue_depth: int,
        stop: asyncio.Event,
        hooks: RelayHooks | None = None,
        hand_over_interval: float = 0.0,
    ) -> None:
        self.queue = queue
        self.stats = stats
        self.sweep_interval = sweep_interval
        self.batch_size = batch_size
        self.max_queue_depth = max_queue_depth
        self.stop = stop
        self.hooks = hooks or RelayHooks()
        self.hand_over_interval = hand_over_interval
        self._last_hand_over = -1e9
        self._behind = False
        self.depth = 0
        self._pending: set[int] = set()
        self._sweep_requested = True
        self._wake = asyncio.Event()
        self._epoch: str | None = None
        self._swept_at = -float("inf")
        self._flood_until = -float("inf")
        self._not_row_ids = notifications.DropLog(
            NOT_A_ROW_ID,
            "dropped notifications that name no row (a forged or foreign NOTIFY; the sweep finds every row)",
        )
        self._overflow = notifications.DropLog(
            PENDING_FULL, f"{MAX_PENDING_IDS} notified ids waiting: later ones are left to the sweep"
        )

    def restart(self) -> None:
        """A new session: notifications sent meanwhile are gone, so sweep first."""
        self._pending.clear()
        self._sweep_requested = True

    def missed(self) -> None:
        """The listener (re)connected: notifications sent meanwhile are gone, so sweep now."""
        self._sweep_requested = True
        self._wake.set()

    def flooded(self, seconds: float) -> None:
        """The listener stops listening for ``seconds`` (a flood): sweep at once, then every
        FLOOD_SWEEP_INTERVAL until then."""
        self._flood_until = asyncio.get_running_loop().time() + seconds
        self.missed()

    def notified(self, payload: str) -> bool:
        """A NOTIFY payload: a row id, ``sweep`` (`requeue` sends it), or anything else: dropped
        and counted (see :mod:`~outbox_relay.relay.notifications`); False then. Never raises."""
        self.stats.notifications += 1
        row_id = notifications.row_id(payload)
        if row_id is None and payload != notifications.SWEEP:
            self._not_row_ids.dropped(payload)
            self.hooks.notification_dropped(NOT_A_ROW_ID)
            return False
        if row_id is not None and len(self._pending) < MAX_PENDING_IDS:
            self._pending.add(row_id)
        else:
            if row_id is not None:  # too many waiting: stop collecting, the sweep finds every new row
                self._overflow.dropped(payload)
                self.hooks.notification_dropped(PENDING_FULL)
            self._sweep_requested = True
        self._wake.set()
        return True

    async def serve(self, store: Store) -> None:
        """Hand rows over until cancelled."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        if self._epoch is None:  # this relay's first sweep (every queued row) before notified rows
            await self.sweep(store)
            self._sweep_requested = False
            next_sweep = loop.time() + self.sweep_interval
        while True:
            raise_if_cancelling()
            self.hooks.beat()
            if not self._pending and not self._sweep_requested:
                due = self._sweep_due(next_sweep, loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, due - loop.time()))
            self._wake.clear()
            self._not_row_ids.flush()
            self._overflow.flush()
            while self._pending:
                # Under a steady stream, let the rows arriving meanwhile join this batch:
                # fewer, larger jobs; longer while the workers are behind (a job now
                # would only wait in the queue). After a quiet spell the wait is zero.
                interval = self.hand_over_interval * (BEHIND_FACTOR if self._behind else 1)
                linger = self._last_hand_over + interval - loop.time()
                if linger > 0 and len(self._pending) < self.batch_size:
                    await asyncio.sleep(linger)
                ids = [self._pending.pop() for _ in range(min(self.batch_size, len(self._pending)))]
                await self._hand_over(store, await store.new_by_ids(ids), path="notify")
            if self._sweep_requested or loop.time() >= next_sweep:
                self._sweep_requested = False
                await self.sweep(store)
                next_sweep = loop.time() + self.sweep_interval
            elif loop.time() >= self._sweep_due(next_sweep, loop.time()):
                await self._sweep_new(store)  # a flood: the new rows only, every FLOOD_SWEEP_INTERVAL

    def _sweep_due(self, next_sweep: float, now: float) -> float:
        """When the next sweep is due: ``next_sweep``, or FLOOD_SWEEP_INTERVAL after the last one
        while the listener is not listening (a flood)."""
        if now < self._flood_until:
            return min(next_sweep, self._swept_at + FLOOD_SWEEP_INTERVAL)
        return next_sweep

    async def _sweep_new(self, store: Store) -> None:
        """Hand over every ``new`` row."""
        self._swept_at = asyncio.get_running_loop().time()
        new = 0
        async for rows in store.new_rows():
            await self._hand_over(store, rows)
            new += len(rows)
        self.hooks.swept_unnotified(new)
        self.stats.swept += new
        if new and self._swept_at >= self._flood_until:  # not a line every 10 ms during a flood
            logger.info("sweep handed rows over", extra={"new": new})

    async def sweep(self, store: Store) -> None:
        """New rows nobody was told about, and queued rows the queue may have lost: all of them
        (first) on this relay's first sweep and when the queue's epoch changed (the queue may have
        changed since the rows went: another queue name, a server restarted meanwhile; rows whose
        jobs wait or run are not added twice), else those older than REQUEUE_AFTER."""
        epoch = await self._queue(self.queue.epoch)
        lost = epoch != self._epoch
        if lost and self._epoch is not None:
            logger.warning(
                "%s restarted or failed over (it may have lost jobs): enqueueing every queued row again",
                self.queue.server,
            )
        self._epoch = epoch
        stale = await self._requeue(store, everything=True) if lost else 0
        await self._sweep_new(store)
        if not lost:
            stale = await self._requeue(store, everything=False)
        self.stats.swept += stale
        self.stats.sweeps += 1  # a sweep done (tests wait for one)
        if stale:
            logger.info("sweep handed queued rows over again", extra={"requeued": stale})

    async def _requeue(self, store: Store, *, everything: bool) -> int:
        """Hand queued rows over again (``everything``, or those older than REQUEUE_AFTER)."""
        stale = 0
        async for rows in store.stale_queued_rows(everything=everything):
            # All queued rows went through backpressure once (most are known: nothing is added);
            # handing them all over again never waits for room, or a full queue would block it.
            await self._hand_over(store, rows, room=not everything)
            stale += len(rows)
        return stale

    async def _hand_over(
        self, store: Store, rows: list[PendingRow], path: str = "sweep", *, room: bool = True
    ) -> None:
        if not rows:
            return
        raise_if_cancelling()
        if room:
            await self._wait_for_room()

        async def hand_over() -> HandOver:
            return await self.queue.hand_over(rows)

        result = await self._queue(hand_over)
        self._last_hand_over = asyncio.get_running_loop().time()
        self.depth = result.depth
        self._behind = result.unclaimed > 0
        await store.mark_queued([row.id for row in rows])
        self.stats.handed_over += len(rows)
        self.stats.enqueued += result.added
        self.hooks.handed_over(path, len(rows))
        self.hooks.queue_depth(self.depth)

    async def _wait_for_room(self) -> None:
        """Backpressure: keep the queue below MAX_QUEUE_DEPTH so a backlog floods nothing."""
        if self.depth < self.max_queue_depth:
            return
        logger.debug("queue full, waiting", extra={"depth": self.depth})
        while self.depth >= self.max_queue_depth // 2:
            self.hooks.beat()
            await asyncio.sleep(FULL_QUEUE_POLL)
            self.depth = await self._queue(self.queue.depth)

    async def _queue(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a queue operation, retrying forever (one log line per attempt).

        An unreachable server is logged as the backend says it ("cannot reach
        <server>: ..."); a refusal as what it is, retried all the same.
        """
        backoff = Backoff(0.1, 5.0)

        async def refusals_logged() -> T:
            while True:
                try:
                    return await operation()
                except QueueUnavailable:
                    raise
                except QueueError as exc:
                    delay = backoff.next_delay()
                    logger.warning(
                        "%s, retrying",
                        exc,
                        extra={"retry_in": round(delay, 2), "attempt": backoff.attempt},
                    )
                    if await stopped_within(self.stop, delay):
                        raise asyncio.CancelledError from None

        with self.hooks.waiting(self.queue.server):
            return await retry(
                refusals_logged,
                what=self.queue.server,
                logger=logger,
                give_up_after=None,
                stop=self.stop,
                backoff=backoff,
                retry_on=(QueueUnavailable,),
            )
