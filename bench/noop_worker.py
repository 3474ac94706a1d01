"""The bench's ceiling: raw arq with outbox_relay's arq settings and a job that does nothing.

Run as ``python -m bench.noop_worker`` (the bench starts it as a subprocess, with
the OUTBOX_RELAY_* environment a `worker` gets). It is built by the adapter's own
:func:`~outbox_relay.arq_adapter.consumer.build_arq_worker` with arq's plain
``Worker`` and a no-op job under the one-row function name, so that arq's
settings are identical to the real worker's; :func:`enqueue_raw_jobs` fills its
queue the way arq itself writes jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.worker import Worker

from outbox_relay import logs
from outbox_relay.arq_adapter import ArqBackend
from outbox_relay.arq_adapter.consumer import ConsumerConfig, build_arq_worker
from outbox_relay.arq_adapter.producer import FUNCTION_NAME, JOB_TTL_MS, redis_client, wake_key
from outbox_relay.composition import queue_backend, service_queue
from outbox_relay.lifecycle import cancel_and_wait, run_async, stop_on_signals
from outbox_relay.settings import load_settings


async def _noop(ctx: dict[str, Any], row_id: int, *_: Any) -> None:
    return None


async def run_noop_worker(config: ConsumerConfig, stop: asyncio.Event) -> None:
    """Run the no-op arq worker until ``stop``."""
    redis = redis_client(
        config.redis_url, queue_name=config.queue_name, max_connections=config.concurrency + 10
    )
    try:
        worker = build_arq_worker(config, redis, {}, coroutine=_noop, worker_class=Worker)
        task = asyncio.create_task(worker.main(), name="bench.noop_worker")
        await stop.wait()
        await cancel_and_wait(task)
    finally:
        with contextlib.suppress(Exception):
            await redis.aclose(close_connection_pool=True)


async def enqueue_raw_jobs(redis: ArqRedis, queue_name: str, namespace: str, first: int, count: int) -> None:
    """Plain arq jobs, one per id from ``first`` (``outbox_relay.process_row``, pickled as arq
    writes them), 500 to a pipeline, each pipeline waking one worker: arq at its own game."""
    now_ms = int(time.time() * 1000)
    for start in range(first, first + count, 500):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(first + count, start + 500)):
                jid = f"{namespace}:{i}"
                payload = serialize_job(FUNCTION_NAME, (i,), {}, None, now_ms)
                pipe.psetex(job_key_prefix + jid, JOB_TTL_MS, payload)
                pipe.zadd(queue_name, {jid: now_ms})
            pipe.rpush(wake_key(queue_name), 1)
            await pipe.execute()


async def _serve() -> int:
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    stop = stop_on_signals()
    backend = queue_backend(settings, await service_queue(settings, stop))
    if not isinstance(backend, ArqBackend):
        raise SystemExit(f"the no-op ceiling is arq's: {backend.name} is not arq")
    await run_noop_worker(backend.consumer_config(), stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_async(_serve()))
