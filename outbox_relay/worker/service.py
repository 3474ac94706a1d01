"""The worker service (`worker`): consumes the queue and applies each row with the processor.

An unreachable database or queue, at start or later, is retried forever with
capped backoff, one log line per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from outbox_relay.db import Pool, create_pool
from outbox_relay.exceptions import MigrationError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.lifecycle import cancel_and_wait
from outbox_relay.logs import describe
from outbox_relay.migrate import check_schema
from outbox_relay.observability.hooks import WorkerHooks
from outbox_relay.queue import Consumer, ConsumerStats
from outbox_relay.retry import retry
from outbox_relay.sql import query
from outbox_relay.worker.deliveries import WORKER_BEAT
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
            await _wait_for_database(pool, handlers, stop, hooks)
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
            async with _beating(pool, handlers):
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


async def _wait_for_database(
    pool: Pool, handlers: HandlerRegistry, stop: asyncio.Event, hooks: WorkerHooks
) -> None:
    """Until the service database answers and its schema is what this code needs (a schema behind
    says `run migrate` in the log and in /readyz, never "cannot reach")."""

    async def ready() -> None:
        async with pool.acquire() as conn:
            try:
                await check_schema(conn, "service", handlers.plugins())
            except MigrationError as exc:
                hooks.not_ready(str(exc))
                raise

    await retry(ready, what="the service database", logger=logger, give_up_after=None, stop=stop)


@contextlib.asynccontextmanager
async def _beating(pool: Pool, handlers: HandlerRegistry) -> AsyncIterator[None]:
    """While inside, this worker is listed in outbox_relay.workers with what it routes (every
    WORKER_BEAT seconds), so that a worker without a route hands rows back to it; unlisted after."""
    name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    kinds, routes = handlers.kinds(), handlers.routes()

    async def beat() -> None:
        while True:
            try:
                await pool.execute(query("heartbeat_worker"), name, routes, kinds)
            except Exception as exc:  # the database away: the next beat tries again
                logger.debug("worker beat not written", extra={"error": describe(exc)})
            await asyncio.sleep(WORKER_BEAT)

    task = asyncio.create_task(beat(), name="worker.beat")
    try:
        yield
    finally:
        await cancel_and_wait(task)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.execute(query("forget_worker"), name), 2.0)
