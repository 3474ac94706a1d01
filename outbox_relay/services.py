"""The long-running services as `run` and `worker` compose them from the settings.

The relay process is the :class:`~outbox_relay.relay.Relay` on the arq queue,
plus the progress report and, with RETENTION set, the retention loop while
active. The worker process is the worker loop on the arq consumer. The CLI
starts these; the tests start the very same ones in their own event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from outbox_relay.arq_adapter import ArqConsumer, ArqQueue, ConsumerConfig, QueueConfig
from outbox_relay.db import Pool
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.observability import Health, Metrics
from outbox_relay.observability.hooks import RelayHooks, WorkerHooks
from outbox_relay.observability.refresh import GaugeRefresher
from outbox_relay.prune import prune_periodically
from outbox_relay.queue import ConsumerStats
from outbox_relay.relay import ActiveTask, Relay
from outbox_relay.relay.report import report_progress
from outbox_relay.settings import Settings
from outbox_relay.worker import run_worker


def queue_config(settings: Settings) -> QueueConfig:
    """The producer side of the queue, as the relay uses it."""
    return QueueConfig(
        settings.redis_url.get_secret_value(),
        settings.queue_name,
        settings.job_namespace,
        batch_size=settings.job_batch_size,
    )


def consumer_config(settings: Settings) -> ConsumerConfig:
    """The consumer side of the queue, as a worker uses it."""
    return ConsumerConfig(
        redis_url=settings.redis_url.get_secret_value(),
        queue_name=settings.queue_name,
        concurrency=settings.worker_concurrency,
        poll_delay=settings.worker_poll_delay,
        job_timeout=settings.job_timeout,
        idle_wait=settings.worker_idle_wait,
    )


@dataclass
class RelayProcess:
    """`run`: the relay, its progress report and (while active) its retention loop."""

    relay: Relay
    queue: ArqQueue
    stop: asyncio.Event

    async def run(self) -> None:
        """Serve until ``stop`` is set."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.relay.run(), name="relay")
                group.create_task(
                    report_progress(self.relay.stats, lambda: self.relay.dispatcher.depth, self.stop),
                    name="relay.report",
                )
        finally:
            await self.queue.close()


def relay_process(
    settings: Settings, stop: asyncio.Event, *, health: Health | None = None, metrics: Metrics | None = None
) -> RelayProcess:
    """Compose `run` from ``settings`` (with ``health``/``metrics`` when HTTP is served)."""
    config = settings.relay_config()
    queue = ArqQueue(queue_config(settings))
    hooks = RelayHooks(health, metrics, deadline=max(30.0, 3 * config.sweep_interval))
    retention = settings.retention_config()
    while_active: list[tuple[str, ActiveTask]] = []
    if retention is not None:

        async def prune(pool: Pool, fence: Callable[[], Awaitable[None]]) -> None:
            await prune_periodically(pool, retention, stop, on_pruned=relay.stats.count_pruned, fence=fence)

        while_active.append(("relay.prune", prune))
    if metrics is not None:
        primary_url = settings.primary_url.get_secret_value() if settings.primary_url else None

        async def gauges(pool: Pool, fence: Callable[[], Awaitable[None]]) -> None:
            assert metrics is not None
            await GaugeRefresher(primary_url, pool, metrics, queue.depth, hooks).run(stop)

        while_active.append(("relay.gauges", gauges))
    relay = Relay(config, queue, stop, while_active=while_active, hooks=hooks)
    return RelayProcess(relay, queue, stop)


async def worker_process(
    settings: Settings,
    handlers: HandlerRegistry,
    stop: asyncio.Event,
    *,
    burst: bool = False,
    health: Health | None = None,
    metrics: Metrics | None = None,
) -> ConsumerStats:
    """`worker`: run until ``stop`` (or, with ``burst``, until the queue is empty)."""
    consumer = ArqConsumer(consumer_config(settings))
    hooks = WorkerHooks(health, metrics, kinds=handlers.kinds())
    try:
        return await run_worker(settings.worker_config(), consumer, handlers, stop, burst=burst, hooks=hooks)
    finally:
        await consumer.close()
