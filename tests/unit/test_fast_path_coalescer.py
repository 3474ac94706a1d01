"""The fast path's group commit (worker/processor.py _Coalescer), with an in-memory statement."""

from __future__ import annotations

import asyncio

import pytest

from outbox_relay.queue import Outcome
from outbox_relay.worker.processor import MAX_MERGED_ROWS, _Coalescer


class Statement:
    """Stands in for the fast-path statement: records each call's rows, finishes the even ids;
    a call holding an id in ``stuck`` waits for ``unstick``, every call for ``release``."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.unstick = asyncio.Event()
        self.stuck: set[int] = set()
        self.fail_next = False

    async def __call__(self, ids: list[int]) -> dict[int, Outcome]:
        self.calls.append(ids)
        if self.stuck & set(ids):
            await self.unstick.wait()
        await self.release.wait()
        if self.fail_next:
            self.fail_next = False
            raise TimeoutError("lock timeout")
        return {i: Outcome("finished", kind="k") for i in ids if i % 2 == 0}


async def _until(predicate: object) -> None:
    async with asyncio.timeout(5):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0)


async def test_jobs_asking_while_a_statement_runs_share_the_next_one() -> None:
    """The first job runs alone at once; three jobs arriving meanwhile share ONE next statement,
    and each gets the outcomes of its own rows only."""
    statement = Statement()
    coalescer = _Coalescer(statement, statements=1)
    first = asyncio.create_task(coalescer.submit([2, 3]))
    await _until(lambda: len(statement.calls) == 1)
    later = [asyncio.create_task(coalescer.submit(ids)) for ids in ([4], [6, 7], [8])]
    await asyncio.sleep(0)
    statement.release.set()
    assert set(await first) == {2}
    assert [set(await t) for t in later] == [{4}, {6}, {8}]
    assert statement.calls == [[2, 3], [4, 6, 7, 8]]


async def test_a_row_asked_for_twice_in_one_statement_is_finished_once() -> None:
    """Two deliveries of row 4 in the same statement: finished for the first, duplicate for the second."""
    statement = Statement()
    coalescer = _Coalescer(statement, statements=1)
    blocker = asyncio.create_task(coalescer.submit([0]))
    await _until(lambda: len(statement.calls) == 1)
    a = asyncio.create_task(coalescer.submit([4]))
    b = asyncio.create_task(coalescer.submit([4]))
    await asyncio.sleep(0)
    statement.release.set()
    await blocker
    assert (await a)[4].result == "finished"
    assert (await b)[4].result == "duplicate"
    assert statement.calls[1] == [4]


async def test_a_failed_statement_fails_its_jobs_only_and_the_next_statement_runs() -> None:
    """The error reaches every job of the failed statement; a job that stopped waiting does not stop
    the statement the others wait for; jobs after it get their outcomes."""
    statement = Statement()
    statement.fail_next = True
    coalescer = _Coalescer(statement, statements=1)
    failing = asyncio.create_task(coalescer.submit([2]))
    await _until(lambda: len(statement.calls) == 1)
    quitter = asyncio.create_task(coalescer.submit([10]))
    waiter = asyncio.create_task(coalescer.submit([12]))
    await asyncio.sleep(0)
    quitter.cancel()
    statement.release.set()
    with pytest.raises(TimeoutError):
        await failing
    assert set(await waiter) == {12}
    assert statement.calls[1] == [12]


async def test_a_merged_statement_takes_at_most_the_row_cap() -> None:
    """Jobs waiting with more rows than MAX_MERGED_ROWS in all are split over several statements."""
    statement = Statement()
    coalescer = _Coalescer(statement, statements=1)
    blocker = asyncio.create_task(coalescer.submit([0]))
    await _until(lambda: len(statement.calls) == 1)
    size = MAX_MERGED_ROWS // 2 + 1
    jobs = [asyncio.create_task(coalescer.submit(list(range(1000 * k, 1000 * k + size)))) for k in (1, 2, 3)]
    await asyncio.sleep(0)
    statement.release.set()
    await blocker
    await asyncio.gather(*jobs)
    assert [len(c) for c in statement.calls[1:]] == [size, size, size]
    assert all(len(c) <= MAX_MERGED_ROWS for c in statement.calls)


async def test_a_statement_waiting_on_a_lock_holds_up_no_other_job() -> None:
    """With two statements allowed, one stuck (a lock) leaves the other slot to the jobs after it:
    they finish while it waits, and it finishes once freed."""
    statement = Statement()
    statement.stuck = {2}
    statement.release.set()
    coalescer = _Coalescer(statement, statements=2)
    stuck = asyncio.create_task(coalescer.submit([2]))
    await _until(lambda: len(statement.calls) == 1)
    others = [asyncio.create_task(coalescer.submit([i])) for i in (4, 6, 8)]
    assert [set(await t) for t in others] == [{4}, {6}, {8}]
    assert not stuck.done()
    statement.unstick.set()
    assert set(await stuck) == {2}


async def test_a_cancelled_statement_fails_its_jobs_instead_of_leaving_them_waiting() -> None:
    """Cancelling the statement's task (shutdown) hands its jobs an error; none waits for ever."""
    statement = Statement()
    coalescer = _Coalescer(statement, statements=1)
    job = asyncio.create_task(coalescer.submit([2]))
    await _until(lambda: len(statement.calls) == 1)
    for task in list(coalescer._running):
        task.cancel()
    with pytest.raises(RuntimeError, match="cancelled"):
        await job
