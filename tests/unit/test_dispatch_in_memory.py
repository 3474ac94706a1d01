"""The relay's dispatcher on the in-memory queue and store (no servers); the queue port itself:
tests/conformance."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from outbox_relay.observability.hooks import RelayHooks
from outbox_relay.observability.metrics import Metrics
from outbox_relay.queue import HandOver, Job, Outcome
from outbox_relay.queue.memory import InMemoryQueue
from outbox_relay.relay import dispatcher as dispatcher_module
from outbox_relay.relay.dispatcher import BEHIND_FACTOR, Dispatcher, RelayStats
from outbox_relay.relay.notifications import DropLog
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


def _dispatcher(
    queue: InMemoryQueue,
    *,
    max_queue_depth: int = 1000,
    hand_over_interval: float = 0.0,
    hooks: RelayHooks | None = None,
) -> Dispatcher:
    return Dispatcher(
        queue,
        RelayStats(),
        sweep_interval=3600,
        batch_size=10,
        max_queue_depth=max_queue_depth,
        stop=asyncio.Event(),
        hand_over_interval=hand_over_interval,
        hooks=hooks,
    )


async def _until(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def _serving(**options: float) -> AsyncIterator[tuple[InMemoryQueue, MemoryStore, Dispatcher]]:
    """A dispatcher serving an in-memory queue and store, past its first sweep; cancelled on exit."""
    queue, store = InMemoryQueue(), MemoryStore()
    dispatcher = _dispatcher(queue, **options)  # type: ignore[arg-type]
    serving = asyncio.create_task(dispatcher.serve(store))
    try:
        await _until(lambda: dispatcher.stats.sweeps == 1)
        yield queue, store, dispatcher
    finally:
        serving.cancel()


async def test_notified_rows_are_handed_over_once_and_marked_queued() -> None:
    """A notified id becomes one job and a queued row; notifying it again adds no second job."""
    async with _serving() as (queue, store, dispatcher):
        store.add(1)
        dispatcher.notified("1")
        await _until(lambda: store.rows[1][1] == "queued")
        dispatcher.notified("1")
        await _until(lambda: dispatcher.stats.notifications == 2 and not dispatcher._pending)
        assert queue.added == ["memory:cid-1#0"]
        assert dispatcher.stats.handed_over == 1


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
    assert await queue.depth() == 1, "the three rows were not handed over again as one batch"
    assert queue.batches[-1] == [1, 2, 3]


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
    queue, store = InMemoryQueue(batch_size=1), MemoryStore()
    for i in range(1, 5):
        store.add(i)
    dispatcher = _dispatcher(queue, max_queue_depth=4)
    await dispatcher.sweep(store)
    store.add(5)
    sweep = asyncio.create_task(dispatcher.sweep(store))
    await asyncio.sleep(0.2)
    assert store.rows[5][1] == "new", "handed over into a full queue"
    stop = asyncio.Event()

    async def finish(jobs: Sequence[Job]) -> list[Outcome]:
        return [Outcome("finished") for _ in jobs]

    consumer = asyncio.create_task(queue.run(finish, stop, burst=True))
    await asyncio.wait_for(sweep, 5)
    assert store.rows[5][1] == "queued"
    await asyncio.wait_for(consumer, 5)


async def test_the_sweep_payload_asks_for_a_sweep() -> None:
    """`requeue` wakes the relay with ``sweep``: that means sweep, not look up an id."""
    dispatcher = _dispatcher(InMemoryQueue())
    dispatcher._sweep_requested = False
    dispatcher.notified("sweep")
    assert dispatcher._sweep_requested
    assert not dispatcher._pending


@pytest.mark.parametrize(
    "payload",
    [
        "x1",
        "",
        "0",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1e3",
        "9223372036854775808",
        "9" * 30,
        "\u00b2",
        "\u0661",
        "7" * 8000,
    ],
)
async def test_a_payload_that_names_no_row_is_dropped_and_counted(payload: str) -> None:
    """Issue 15.1: out of bigint range, zero, negative, signed, non-ASCII digits, huge: dropped and
    counted (metric, reason not_a_row_id), never a pending id, never raises."""
    metrics = Metrics("relay")
    dispatcher = _dispatcher(InMemoryQueue(), hooks=RelayHooks(metrics=metrics))
    dispatcher.notified(payload)
    dispatcher.notified(payload)
    assert not dispatcher._pending
    assert b'outbox_relay_notifications_dropped_total{reason="not_a_row_id"} 2.0' in metrics.exposition()


async def test_row_ids_up_to_the_largest_bigint_are_kept() -> None:
    """1 and 2**63 - 1 are row ids; leading zeros name the same row."""
    dispatcher = _dispatcher(InMemoryQueue())
    for payload in ("1", "9223372036854775807", "007"):
        dispatcher.notified(payload)
    assert dispatcher._pending == {1, 7, 2**63 - 1}


async def test_past_max_pending_ids_ids_are_left_to_the_sweep_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With MAX_PENDING_IDS waiting the relay stops collecting ids: counted as pending_full, a sweep asked."""
    monkeypatch.setattr(dispatcher_module, "MAX_PENDING_IDS", 3)
    metrics = Metrics("relay")
    dispatcher = _dispatcher(InMemoryQueue(), hooks=RelayHooks(metrics=metrics))
    dispatcher._sweep_requested = False
    for i in range(1, 6):
        dispatcher.notified(str(i))
    assert dispatcher._pending == {1, 2, 3}
    assert dispatcher._sweep_requested
    assert b'outbox_relay_notifications_dropped_total{reason="pending_full"} 2.0' in metrics.exposition()


def test_dropped_notifications_are_logged_at_most_once_per_period_escaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One line per LOG_EVERY with the count since the last and a truncated, escaped sample."""
    now = [0.0]
    log = DropLog("not_a_row_id", "dropped", every=10.0, clock=lambda: now[0])
    with caplog.at_level("WARNING"):
        for i in range(1000):
            log.dropped(f"\u202e\x1b[2J{i}" + "x" * 100)
        now[0] = 10.0
        log.flush()
    lines = [r for r in caplog.records if r.getMessage() == "dropped"]
    assert [r.dropped for r in lines] == [1, 999]  # type: ignore[attr-defined]
    sample = lines[-1].sample  # type: ignore[attr-defined]
    assert "\u202e" not in sample
    assert "\x1b" not in sample
    assert sample.startswith("'\\u202e\\x1b[2J999")
    assert sample.endswith("(108 chars)")
    assert log.total == 1000


async def test_a_refusal_is_logged_as_what_the_server_said_not_as_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 7.3: a QueueError (an error reply) is retried and logged as the refusal, not "cannot reach"."""
    from outbox_relay.exceptions import QueueError

    class RefusingOnce(InMemoryQueue):
        refused = False

        async def hand_over(self, rows: Sequence[PendingRow]) -> HandOver:  # type: ignore[override]
            if not self.refused:
                self.refused = True
                raise QueueError("Redis refused: WRONGTYPE q holds a string, not a zset")
            return await super().hand_over(rows)

    queue, store = RefusingOnce(), MemoryStore()
    store.add(1)
    with caplog.at_level("WARNING"):
        await asyncio.wait_for(_dispatcher(queue).sweep(store), 5)
    assert store.rows[1][1] == "queued"
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Redis refused: WRONGTYPE") for m in messages), messages
    assert not any("cannot reach" in m for m in messages), messages


async def test_rows_notified_within_the_hand_over_interval_travel_together_a_lone_row_at_once() -> None:
    """Adaptive batches: after a quiet spell a row is handed over at once (a job of one row);
    rows notified while the interval since the last hand-over runs join one batch."""
    queue, store = InMemoryQueue(), MemoryStore()
    dispatcher = _dispatcher(queue, hand_over_interval=0.2)
    serving = asyncio.create_task(dispatcher.serve(store))
    try:
        await _until(lambda: dispatcher.stats.sweeps == 1)
        loop = asyncio.get_running_loop()
        store.add(1)
        started = loop.time()
        dispatcher.notified("1")
        await _until(lambda: store.rows[1][1] == "queued")
        assert loop.time() - started < 0.1, "a lone row waited for the interval"
        for i in (2, 3, 4):  # a stream: 20 ms apart, inside the 200 ms interval
            store.add(i)
            dispatcher.notified(str(i))
            await asyncio.sleep(0.02)
        await _until(lambda: all(store.rows[i][1] == "queued" for i in (2, 3, 4)))
        assert queue.batches == [[1], [2, 3, 4]]
    finally:
        serving.cancel()


async def test_while_the_workers_are_behind_notified_rows_linger_longer_and_travel_together() -> None:
    """Once a hand-over finds due jobs no worker has taken, the next waits BEHIND_FACTOR intervals:
    rows notified 150 ms apart (past the 100 ms interval) join one batch instead of going alone."""
    queue, store = InMemoryQueue(), MemoryStore()  # no consumer: every job stays unclaimed
    dispatcher = _dispatcher(queue, hand_over_interval=0.1)
    assert BEHIND_FACTOR * 0.1 > 0.3 + 0.05, "the test's spacing assumes a window of 0.4 s"
    serving = asyncio.create_task(dispatcher.serve(store))
    try:
        await _until(lambda: dispatcher.stats.sweeps == 1)
        for i in (1, 2):  # row 1 finds no unclaimed job; row 2 finds row 1's
            store.add(i)
            dispatcher.notified(str(i))
            await _until(lambda i=i: store.rows[i][1] == "queued")
            await asyncio.sleep(0.15)  # pacing past the interval, not synchronisation
        for i in (3, 4):
            store.add(i)
            dispatcher.notified(str(i))
            if i == 3:
                await asyncio.sleep(0.15)
        await _until(lambda: all(store.rows[i][1] == "queued" for i in (3, 4)))
        assert queue.batches == [[1], [2], [3, 4]]
    finally:
        serving.cancel()


async def test_while_the_listener_holds_off_a_flood_new_rows_are_swept_every_flood_sweep_interval() -> None:
    """Issue 15.1: flooded(seconds) makes the dispatcher hand new rows over without any notification,
    every FLOOD_SWEEP_INTERVAL (SWEEP_INTERVAL is an hour here), until the hold ends."""
    async with _serving() as (_queue, store, dispatcher):
        dispatcher.flooded(1.0)
        loop = asyncio.get_running_loop()
        for i in (1, 2, 3):
            store.add(i)
            added = loop.time()
            await _until(lambda i=i: store.rows[i][1] == "queued", timeout=0.5)
            assert loop.time() - added < 10 * dispatcher_module.FLOOD_SWEEP_INTERVAL
        await asyncio.sleep(1.0)  # past the hold, not synchronisation
        store.add(4)
        await asyncio.sleep(0.3)
        assert store.rows[4][1] == "new", "swept after the flood hold ended"
