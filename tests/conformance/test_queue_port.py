"""The queue port's documented behaviour (outbox_relay/queue/__init__.py), on every implementation.

Each test runs once on the in-memory queue and once on the arq adapter with a
real Redis (the ``backend`` fixture): where they differ, one of them is wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from outbox_relay.queue import ConsumerStats, Job, Outcome, split_batches
from tests.conformance.backends import DEADLINE, Backend, Recorder, Row, answered, rows, run_burst

# -- hand-over and dedupe ------------------------------------------------------------------------------


async def test_a_row_is_added_once_while_its_job_waits_or_runs_and_again_once_it_finished(
    backend: Backend,
) -> None:
    """Dedupe: a row handed over while its job waits or runs is not added; once finished it can be."""
    queue, row = backend.queue, Row(1, "a")
    assert (await queue.hand_over([row])).added == 1
    again = await queue.hand_over([row])
    assert (again.added, again.depth) == (0, 1), "a row whose job waits was added again"
    mixed = await queue.hand_over([row, Row(2, "b")])
    assert (mixed.added, mixed.depth) == (1, 2), "a known row kept a new one out, or was added with it"
    while_running: list[int] = []

    async def hand_over_again(jobs: Sequence[Job]) -> list[Outcome]:
        if any(job.row_id == 1 for job in jobs):
            while_running.append((await queue.hand_over([row])).added)
        return [Outcome("finished") for _ in jobs]

    await run_burst(backend.consumer(), hand_over_again)
    assert while_running == [0], "a row whose job runs was added again"
    after = await queue.hand_over([row, Row(2, "b")])
    assert (after.added, after.depth) == (2, 1), "a finished row could not be handed over again"


async def test_a_requeued_generation_is_a_new_job_even_while_the_old_one_waits(backend: Backend) -> None:
    """The same correlation id with generation + 1 is its own row: added while generation 0 waits."""
    queue = backend.queue
    assert (await queue.hand_over([Row(1, "a", 0)])).added == 1
    requeued = await queue.hand_over([Row(2, "a", 1)])
    assert (requeued.added, requeued.depth) == (1, 2)
    assert (await queue.hand_over([Row(1, "a", 0), Row(2, "a", 1)])).added == 0
    recorder = Recorder()
    await run_burst(backend.consumer(), recorder)
    assert sorted(recorder.batches) == [[(1, 1)], [(2, 1)]]


@pytest.mark.parametrize(
    ("count", "batch_size", "sizes"),
    [
        (1, 50, [1]),
        (50, 50, [50]),
        (51, 50, [26, 25]),
        (120, 50, [40, 40, 40]),
        (7, 3, [3, 2, 2]),
        (3, 1, [1, 1, 1]),
    ],
)
async def test_a_hand_over_packs_rows_into_as_few_even_batches_as_the_batch_size_allows(
    backend: Backend, count: int, batch_size: int, sizes: list[int]
) -> None:
    """Batching: n rows become ceil(n / batch_size) even jobs, which a consumer sees as batches of Job."""
    assert split_batches(count, batch_size) == sizes
    handed = await backend.producer(batch_size).hand_over(rows(*range(1, count + 1)))
    assert (handed.added, handed.depth) == (count, len(sizes))
    recorder = Recorder()
    stats = await run_burst(backend.consumer(), recorder)
    assert sorted((len(batch) for batch in recorder.batches), reverse=True) == sizes
    seen = sorted(pair for batch in recorder.batches for pair in batch)
    assert seen == [(i, 1) for i in range(1, count + 1)], "a row was lost, doubled or not a first delivery"
    assert (stats.complete, stats.rows) == (len(sizes), count)


# -- settling: finished, retried, put off --------------------------------------------------------------


async def test_a_retried_row_runs_again_alone_after_its_delay_and_a_finished_row_once(
    backend: Backend,
) -> None:
    """Outcome.retry(delay): that row alone runs again (delivery 2) after the delay; finished rows once."""
    delay = 0.3

    def retry_two_and_three(call: int, jobs: Sequence[Job]) -> list[Outcome]:
        return [
            Outcome.retry(delay) if call == 1 and job.row_id != 1 else Outcome("finished") for job in jobs
        ]

    await backend.queue.hand_over(rows(1, 2, 3))
    recorder = Recorder(retry_two_and_three)
    stats = await run_burst(backend.consumer(), recorder)
    assert recorder.batches[0] == [(1, 1), (2, 1), (3, 1)]
    assert sorted(recorder.batches[1:]) == [[(2, 2)], [(3, 2)]], "retried rows did not run again alone"
    for started in recorder.started[1:]:
        assert started - recorder.ended[0] >= delay - 0.02, "a retry ran before its delay"
    assert stats == ConsumerStats(complete=3, retried=2, rows=5)
    assert await backend.queue.depth() == 0
    assert (await backend.queue.hand_over(rows(1, 2, 3))).added == 3, "a finished row kept its marker"


async def test_rows_put_off_run_again_together_at_once_with_the_same_delivery(backend: Backend) -> None:
    """Outcome.put_off(): the rows run again at once, together, and the delivery is not counted."""

    def put_off_all_but_the_first(call: int, jobs: Sequence[Job]) -> list[Outcome]:
        if call > 1:
            return [Outcome("finished") for _ in jobs]
        return [Outcome("finished")] + [Outcome.put_off() for _ in jobs[1:]]

    await backend.queue.hand_over(rows(1, 2, 3))
    recorder = Recorder(put_off_all_but_the_first)
    stats = await run_burst(backend.consumer(), recorder)
    assert recorder.batches == [[(1, 1), (2, 1), (3, 1)], [(2, 1), (3, 1)]]
    assert recorder.started[1] - recorder.ended[0] < DEADLINE / 4, "rows put off waited"
    assert stats == ConsumerStats(complete=2, retried=0, rows=5)
    assert (await backend.queue.hand_over(rows(1, 2, 3))).added == 3, "a finished row kept its marker"


async def test_a_deferred_retry_counts_in_the_depth_and_keeps_its_row_from_being_added(
    backend: Backend,
) -> None:
    """A retry waiting for its delay is a waiting job (depth) holding its row (no second job)."""
    queue, stop = backend.queue, asyncio.Event()

    async def retry_later(jobs: Sequence[Job]) -> list[Outcome]:
        stop.set()  # the consumer stops once this job has settled
        return [Outcome.retry(DEADLINE * 3) for _ in jobs]

    await queue.hand_over(rows(1))
    stats = await asyncio.wait_for(backend.consumer().run(retry_later, stop), DEADLINE)
    assert (stats.complete, stats.retried) == (1, 1)
    assert await queue.depth() == 1, "a deferred retry is not counted as waiting"
    handed = await queue.hand_over(rows(1))
    assert (handed.added, handed.depth) == (0, 1), "a row whose retry waits was added again"


# -- depth, epoch, lost jobs ---------------------------------------------------------------------------


async def test_the_depth_counts_waiting_jobs_not_rows(backend: Backend) -> None:
    """depth() is the number of jobs waiting: one per hand-over of a few rows, none once consumed."""
    queue = backend.queue
    assert await queue.depth() == 0
    for i in (1, 2, 3):
        assert (await queue.hand_over(rows(i))).depth == i
        assert await queue.depth() == i
    assert (await queue.hand_over(rows(4, 5, 6, 7))).depth == 4
    assert await queue.depth() == 4
    assert (await queue.hand_over([])).added == 0
    assert await queue.depth() == 4
    await run_burst(backend.consumer(), Recorder())
    assert await queue.depth() == 0


async def test_the_epoch_is_stable_while_the_server_keeps_its_data_and_changes_when_it_lost_it(
    backend: Backend,
) -> None:
    """epoch() stays through hand-overs and consumption and changes once the server restarted empty."""
    queue = backend.queue
    before = await queue.epoch()
    assert before, "an empty epoch"
    await queue.hand_over(rows(1, 2))
    await run_burst(backend.consumer(), Recorder())
    await queue.hand_over(rows(3))
    assert await queue.epoch() == before
    await backend.restart_empty()
    after = await answered(queue.epoch)
    assert after != before, "the queue lost its jobs and the epoch did not change"
    assert await queue.epoch() == after
    assert await queue.depth() == 0
    handed = await queue.hand_over(rows(3))
    assert (handed.added, handed.depth) == (1, 1), "a row of a lost job was not handed over again"


async def test_a_row_whose_marker_outlived_its_job_is_scheduled_again(backend: Backend) -> None:
    """Orphaned markers: a row whose job is gone (neither waiting nor running) is added again."""
    queue = backend.queue
    await queue.hand_over(rows(1, 2))
    await backend.orphan_waiting()
    assert await queue.depth() == 0
    assert (await queue.hand_over(rows(3))).added == 1
    handed = await queue.hand_over(rows(1, 2, 3))
    assert (handed.added, handed.depth) == (2, 2), "an orphaned row was skipped, or a waiting one added"
    recorder = Recorder()
    await run_burst(backend.consumer(), recorder)
    assert sorted(recorder.batches) == [[(1, 1), (2, 1)], [(3, 1)]]


# -- consumers ---------------------------------------------------------------------------------------


async def test_a_burst_returns_once_the_queue_is_empty_with_what_it_ran(backend: Backend) -> None:
    """run(burst=True) returns at once on an empty queue, and after draining one with its stats."""
    assert await run_burst(backend.consumer(), Recorder()) == ConsumerStats()
    await backend.producer(2).hand_over(rows(1, 2, 3, 4, 5))
    stats = await run_burst(backend.consumer(), Recorder())
    assert stats == ConsumerStats(complete=3, rows=5)
    assert await backend.queue.depth() == 0


async def test_consumers_sharing_a_queue_run_each_job_once(backend: Backend) -> None:
    """Two consumers on one queue run jobs at the same time, never the same job twice."""
    await backend.producer(1).hand_over(rows(1, 2, 3, 4))
    second_started = asyncio.Event()
    seen: list[int] = []

    async def first_waits_for_a_second(jobs: Sequence[Job]) -> list[Outcome]:
        seen.extend(job.row_id for job in jobs)
        if len(seen) == 1:
            await asyncio.wait_for(second_started.wait(), DEADLINE)
        else:
            second_started.set()
        return [Outcome("finished") for _ in jobs]

    first, second = backend.consumer(), backend.consumer()
    both = await asyncio.gather(
        run_burst(first, first_waits_for_a_second), run_burst(second, first_waits_for_a_second)
    )
    assert sorted(seen) == [1, 2, 3, 4], "a job ran twice, or not at all"
    assert sum(stats.complete for stats in both) == 4


# -- service database identity ------------------------------------------------------------------------


class _Refusals:
    """An observer noting the foreign jobs a consumer refused."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def beat(self) -> None: ...

    def not_ready(self, reason: str) -> None: ...

    def foreign_job(self, job_database: str, own: str) -> None:
        self.seen.append((job_database, own))


async def test_a_job_of_another_database_is_refused_and_put_back_untouched_for_its_own_workers(
    backend: Backend,
) -> None:
    """A consumer of database B never runs database A's job: it tells its observer, the job waits
    (deferred), its rows stay known, and a consumer of A then runs it as a first delivery."""
    producer = backend.producer(50, identity="sys/1")
    assert (await producer.hand_over(rows(1, 2, 3))).added == 3
    foreign, refusals, stop = Recorder(), _Refusals(), asyncio.Event()
    consumer = backend.consumer(identity="sys/2")
    running = asyncio.create_task(consumer.run(foreign, stop, observer=refusals))
    try:
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not refusals.seen:
            assert asyncio.get_running_loop().time() < deadline, "the foreign job was never looked at"
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(running, DEADLINE)
    assert foreign.batches == [], "a consumer ran another database's job"
    assert refusals.seen[0] == ("sys/1", "sys/2")
    assert await producer.depth() == 1, "the refused job was lost (or split)"
    assert (await producer.hand_over(rows(1, 2, 3))).added == 0, "the refused job's rows lost their marker"
    own = Recorder()
    stats = await run_burst(backend.consumer(identity="sys/1"), own)
    assert own.batches == [[(1, 1), (2, 1), (3, 1)]], "not run by its own database's consumer as it came"
    assert stats.rows == 3
