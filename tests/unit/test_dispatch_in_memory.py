"""The relay's dispatcher and the queue port's contract, on the in-memory queue and store (no servers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from outbox_relay.queue import Job, Outcome
from outbox_relay.queue.memory import InMemoryQueue
from outbox_relay.relay.dispatcher import Dispatcher, RelayStats
from outbox_relay.relay.store import PendingRow


@dataclass
class MemoryStore:
    """The relay's store over a dict: id -> (correlation id, status)."""

    rows: dict[int, list[str]] = field(default_factory=dict)
    stale: bool = False

    def add(self, row_id: int) -> None:
        self.rows[row_id] = [f"cid-{row_id}", "new"]

    async def new_rows(self) -> AsyncIterator[list[PendingRow]]:
        rows = [PendingRow(i, cid) for i, (cid, status) in sorted(self.rows.items()) if status == "new"]
        if rows:
            yield rows

    async def stale_queued_rows(self, *, everything: bool = False) -> AsyncIterator[list[PendingRow]]:
        if everything or self.stale:
            rows = [PendingRow(i, c) for i, (c, status) in sorted(self.rows.items()) if status == "queued"]
            if rows:
                yield rows

    async def new_by_ids(self, ids: Sequence[int]) -> list[PendingRow]:
        return [PendingRow(i, self.rows[i][0]) for i in sorted(ids) if self.rows.get(i, ["", ""])[1] == "new"]

    async def mark_queued(self, ids: Sequence[int]) -> None:
        for i in ids:
            if self.rows[i][1] in ("new", "queued"):
                self.rows[i][1] = "queued"


def _dispatcher(queue: InMemoryQueue, *, max_queue_depth: int = 1000) -> Dispatcher:
    return Dispatcher(
        queue,
        RelayStats(),
        sweep_interval=3600,
        batch_size=10,
        max_queue_depth=max_queue_depth,
        stop=asyncio.Event(),
    )


async def _until(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


async def test_notified_rows_are_handed_over_once_and_marked_queued() -> None:
    """A notified id becomes one job and a queued row; notifying it again adds no second job."""
    queue, store = InMemoryQueue(), MemoryStore()
    dispatcher = _dispatcher(queue)
    serving = asyncio.create_task(dispatcher.serve(store))
    try:
        await _until(lambda: dispatcher.stats.sweeps == 1)
        store.add(1)
        dispatcher.notified("1")
        await _until(lambda: store.rows[1][1] == "queued")
        dispatcher.notified("1")
        await _until(lambda: dispatcher.stats.notifications == 2 and not dispatcher._pending)
        assert queue.added == ["memory:cid-1#0"]
        assert dispatcher.stats.handed_over == 1
    finally:
        serving.cancel()


async def test_a_new_queue_epoch_hands_every_queued_row_over_again() -> None:
    """When the queue may have lost its jobs (epoch changed), the next sweep re-enqueues queued rows."""
    queue, store = InMemoryQueue(), MemoryStore()
    for i in (1, 2, 3):
        store.add(i)
    dispatcher = _dispatcher(queue)
    await dispatcher.sweep(store)
    assert {status for _, status in store.rows.values()} == {"queued"}
    assert len(queue.added) == 3
    await dispatcher.sweep(store)
    assert len(queue.added) == 3, "an unchanged epoch re-enqueued rows"
    queue.lose_everything()
    await dispatcher.sweep(store)
    assert len(queue.added) == 6
    assert await queue.depth() == 3


async def test_an_unavailable_queue_is_retried_until_it_answers() -> None:
    """A hand-over while the queue is away waits and retries; the row is queued once it is back."""
    queue, store = InMemoryQueue(), MemoryStore()
    store.add(7)
    queue.available = False
    dispatcher = _dispatcher(queue)
    sweep = asyncio.create_task(dispatcher.sweep(store))
    await asyncio.sleep(0.3)
    assert not sweep.done()
    assert store.rows[7][1] == "new", "a row was marked queued although the queue did not take it"
    queue.available = True
    await asyncio.wait_for(sweep, 5)
    assert store.rows[7][1] == "queued"


async def test_backpressure_holds_hand_over_until_the_queue_drains() -> None:
    """With the queue at MAX_QUEUE_DEPTH the dispatcher waits until it is below half of it."""
    queue, store = InMemoryQueue(), MemoryStore()
    for i in range(1, 5):
        store.add(i)
    dispatcher = _dispatcher(queue, max_queue_depth=4)
    await dispatcher.sweep(store)
    store.add(5)
    sweep = asyncio.create_task(dispatcher.sweep(store))
    await asyncio.sleep(0.2)
    assert store.rows[5][1] == "new", "handed over into a full queue"
    stop = asyncio.Event()

    async def finish(job: Job) -> Outcome:
        return Outcome("finished")

    consumer = asyncio.create_task(queue.run(finish, stop, burst=True))
    await asyncio.wait_for(sweep, 5)
    assert store.rows[5][1] == "queued"
    await asyncio.wait_for(consumer, 5)


async def test_in_memory_consumer_retries_after_the_delay_and_forgets_finished_jobs() -> None:
    """A job asking for a retry runs again (delivery 2) after its delay; once done its id can be reused."""
    queue = InMemoryQueue()
    deliveries: list[tuple[int, int]] = []

    async def flaky(job: Job) -> Outcome:
        deliveries.append((job.row_id, job.delivery))
        return Outcome.retry(0.05) if job.delivery == 1 else Outcome("finished")

    await queue.hand_over([PendingRow(1, "a")])
    assert (await queue.hand_over([PendingRow(1, "a")])).added == 0, "a known job was added twice"
    stats = await asyncio.wait_for(queue.run(flaky, asyncio.Event(), burst=True), 5)
    assert deliveries == [(1, 1), (1, 2)]
    assert (stats.complete, stats.retried) == (1, 1)
    assert (await queue.hand_over([PendingRow(1, "a")])).added == 1


@pytest.mark.parametrize("payload", ["sweep", "x1", ""])
async def test_a_payload_that_is_not_a_row_id_asks_for_a_sweep(payload: str) -> None:
    """`requeue` wakes the relay with a non-numeric payload: that means sweep, not look up an id."""
    dispatcher = _dispatcher(InMemoryQueue())
    dispatcher._sweep_requested = False
    dispatcher.notified(payload)
    assert dispatcher._sweep_requested
    assert not dispatcher._pending
