"""The worker service (`worker`): consumes the queue and applies each row with the processor.

An unreachable database or queue, at start or later, is retried forever with
capped backoff, one log line per attempt.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

from outbox_relay.db import Pool, create_pool
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.migrate import check_schema
from outbox_relay.observability.hooks import WorkerHooks
from outbox_relay.queue import Consumer, ConsumerStats
from outbox_relay.retry import retry
from outbox_relay.worker.processor import RowProcessor, WorkerConfig, lock_timeout_setting

logger = logging.getLogger(__name__)


async def run_worker(
    config: WorkerConfig,
    consumer: Consumer,
    handlers: HandlerRegistry,
    stop: asyncio.Event,
    *,
    burst: bool = False,
    hooks: WorkerHooks | None = None,
) -> ConsumerStats:
    """Run until ``stop`` is set (or, with ``burst``, until the queue is empty)."""
    hooks = hooks or WorkerHooks()
    pool = await create_pool(
        config.database_url,
        max_size=config.concurrency,
        application_name="outbox_relay.worker",
        session_settings=lock_timeout_setting(config),
    )
    stats = ConsumerStats()
    try:
        with hooks.waiting(f"the service database and {consumer.server}"):
            await _wait_for_database(pool, handlers, stop)
            await consumer.wait_until_ready(stop)
        async with AsyncExitStack() as lifespans:  # the plugins' long-lived connections
            for plugin in handlers.plugins():
                if plugin.lifespan is not None:
                    await lifespans.enter_async_context(plugin.lifespan())
            hooks.ready()
            logger.info(
                "worker started",
                extra={
                    "concurrency": config.concurrency,
                    "kinds": ",".join(handlers.kinds()),
                    "routes": ",".join(handlers.routes()),
                    "burst": burst,
                },
            )
            processor = hooks.instrument(RowProcessor(config, pool, handlers))
            stats = await consumer.run(processor, stop, burst=burst, observer=hooks)
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
    finally:
        try:
            await asyncio.wait_for(pool.close(), 5.0)
        except Exception:
            pool.terminate()
    logger.info("worker stopped", extra={"complete": stats.complete, "retried": stats.retried})
    return stats


async def _wait_for_database(pool: Pool, handlers: HandlerRegistry, stop: asyncio.Event) -> None:
    async def ready() -> None:
        async with pool.acquire() as conn:
            await check_schema(conn, "service", handlers.plugins())

    await retry(ready, what="the service database", logger=logger, give_up_after=None, stop=stop)
