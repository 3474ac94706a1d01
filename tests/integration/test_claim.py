"""The worker's claim (claim.lua): one call per poll, each job claimed by one worker only."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.jobs import serialize_job
from arq.worker import func

from outbox_relay.arq_adapter.consumer import OutboxWorker
from outbox_relay.arq_adapter.producer import redis_client
from tests.helpers import wait_until
from tests.servers import RedisServer


@pytest.fixture
async def queue(redis_server: RedisServer) -> AsyncIterator[tuple[str, Any]]:
    """A fresh queue name on the shared Redis, and a client; the queue's keys are dropped after."""
    name = f"claim-{uuid.uuid4().hex[:8]}"
    redis = redis_client(redis_server.url(), queue_name=name)
    yield name, redis
    keys = [k async for k in redis.scan_iter(match=f"arq:*:{name}:*")]
    await redis.delete(name, *keys)
    await redis.aclose(close_connection_pool=True)


def _worker(redis: Any, queue_name: str, max_jobs: int = 10) -> tuple[OutboxWorker, list[str]]:
    """An OutboxWorker whose job records the ids it ran and waits until cancelled."""
    ran: list[str] = []

    async def job(ctx: dict[str, Any]) -> None:
        ran.append(ctx["job_id"])
        await asyncio.Event().wait()

    worker = OutboxWorker(
        functions=[func(job, name="job")],
        queue_name=queue_name,
        redis_pool=redis,
        handle_signals=False,
        max_jobs=max_jobs,
    )
    worker.ctx["redis"] = redis
    return worker, ran


async def _enqueue(redis: Any, queue_name: str, ids: list[str], *, delay_ms: int = 0) -> None:
    """arq jobs of the function ``job`` (as arq writes them), due in ``delay_ms``."""
    score = int(time.time() * 1000) + delay_ms
    for job_id in ids:
        await redis.psetex(f"arq:job:{job_id}", 60_000, serialize_job("job", (), {}, None, score))
    await redis.zadd(queue_name, {job_id: score for job_id in ids})


async def _stop(*workers: OutboxWorker) -> None:
    tasks = [t for w in workers for t in w.tasks.values()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_two_workers_claiming_one_window_at_once_take_each_job_once(
    queue: tuple[str, Any],
) -> None:
    """Two workers claiming the same 20 ids at the same time split them: none claimed by both,
    none left out, and each claimed job has arq's in-progress key with a time-to-live."""
    name, redis = queue
    ids = [f"{name}:job-{i}" for i in range(20)]
    await _enqueue(redis, name, ids)
    a, _ = _worker(redis, name, max_jobs=30)
    b, _ = _worker(redis, name, max_jobs=30)
    window = [i.encode() for i in ids]
    try:
        await asyncio.gather(a.start_jobs(list(window)), b.start_jobs(list(window)))
        taken_a, taken_b = set(a.tasks), set(b.tasks)
        assert taken_a.isdisjoint(taken_b), "a job was claimed by both workers"
        assert taken_a | taken_b == set(ids)
        ttl = await redis.pttl(f"arq:in-progress:{ids[0]}")
        assert 0 < ttl <= int(a.in_progress_timeout_s * 1000)
    finally:
        await _stop(a, b)


async def test_a_poll_skips_running_jobs_jobs_in_progress_elsewhere_and_jobs_not_due(
    queue: tuple[str, Any],
) -> None:
    """A job this worker runs, one another worker holds (in-progress key), one deferred into the
    future and one no longer in the queue are not claimed; the due, free ones are, and they run."""
    name, redis = queue
    free = [f"{name}:free-{i}" for i in range(3)]
    held, later, gone = f"{name}:held", f"{name}:later", f"{name}:gone"
    await _enqueue(redis, name, [*free, held])
    await _enqueue(redis, name, [later], delay_ms=60_000)
    await redis.psetex(f"arq:in-progress:{held}", 60_000, b"1")
    worker, ran = _worker(redis, name)
    try:
        await worker.start_jobs([i.encode() for i in [*free, held, later, gone]])
        assert set(worker.tasks) == set(free)
        await wait_until(lambda: sorted(ran) == sorted(free), message="the claimed jobs run")
        await worker.start_jobs([i.encode() for i in free])  # running here: nothing new, nothing doubled
        assert worker.job_counter == 3
        assert sorted(ran) == sorted(free)
    finally:
        await _stop(worker)


async def test_a_poll_claims_no_more_jobs_than_the_worker_has_free_slots(queue: tuple[str, Any]) -> None:
    """With 2 slots, a poll of 5 due jobs claims 2; the other 3 keep no in-progress key, free for others."""
    name, redis = queue
    ids = [f"{name}:job-{i}" for i in range(5)]
    await _enqueue(redis, name, ids)
    worker, _ = _worker(redis, name, max_jobs=2)
    try:
        await worker.start_jobs([i.encode() for i in ids])
        assert len(worker.tasks) == 2
        unclaimed = [i for i in ids if i not in worker.tasks]
        assert [await redis.exists(f"arq:in-progress:{i}") for i in unclaimed] == [0, 0, 0]
    finally:
        await _stop(worker)
