"""[1] The ceiling: raw arq no-op jobs through the same Redis, same worker count and arq settings."""

from __future__ import annotations

import asyncio
import time
import uuid

from arq.connections import ArqRedis

from bench import BenchError
from bench.fleet import Fleet
from bench.noop_worker import enqueue_raw_jobs
from outbox_relay.arq_adapter.producer import redis_client
from outbox_relay.settings import Settings

#: Jobs run first, unmeasured, so that every worker is up.
WARM_UP_JOBS = 20


async def measure(settings: Settings, fleet: Fleet, workers: int, jobs: int) -> float:
    """Jobs per second ``workers`` no-op workers (``python -m bench.noop_worker``) run."""
    queue_name = f"{settings.queue_name}_noop"
    namespace = f"noop:{uuid.uuid4().hex[:6]}"
    saved = dict(fleet.env)
    fleet.env["OUTBOX_RELAY_QUEUE_NAME"] = queue_name
    redis = redis_client(settings.redis_url.get_secret_value(), queue_name=queue_name)
    try:
        fleet.start(workers, relay=False, noop=True)
        await enqueue_raw_jobs(redis, queue_name, namespace, 0, WARM_UP_JOBS)
        await _wait_drained(redis, queue_name, fleet)
        start = time.monotonic()
        await enqueue_raw_jobs(redis, queue_name, namespace, WARM_UP_JOBS, jobs)
        await _wait_drained(redis, queue_name, fleet)
        return jobs / (time.monotonic() - start)
    finally:
        fleet.stop()
        fleet.env.clear()
        fleet.env.update(saved)
        await redis.aclose(close_connection_pool=True)


async def _wait_drained(redis: ArqRedis, queue_name: str, fleet: Fleet, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while await redis.zcard(queue_name) > 0:
        fleet.check_alive()
        if time.monotonic() > deadline:
            raise BenchError("the no-op queue did not drain in time")
        await asyncio.sleep(0.005)
