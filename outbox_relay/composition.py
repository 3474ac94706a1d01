"""The composition root: every narrow config is built here from the settings, and the services from them.

The CLI reads the settings once and calls this module; nothing below it sees
:class:`~outbox_relay.settings.Settings` (``tests/unit/test_architecture.py``
enforces it). The relay process is the :class:`~outbox_relay.relay.Relay` on
the queue backend the URL's scheme picks, plus the progress report and, with
RETENTION set, the retention loop while active; the worker process is the
worker loop on that backend's consumer. Both first connect to the service
database for its identity: the queue's name (QUEUE_NAME, else derived from it)
and what every job carries (:func:`service_queue`). The CLI starts these; the
tests start the very same ones in their own event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from outbox_relay.db import Pool, connect_retrying
from outbox_relay.doctor import DoctorConfig
from outbox_relay.exceptions import PluginError, SettingsError
from outbox_relay.handlers import HandlerRegistry, load_plugins
from outbox_relay.handlers import registry as default_registry
from outbox_relay.identity import ServiceQueue, job_namespace, resolve_queue
from outbox_relay.observability import Health, Metrics
from outbox_relay.observability.hooks import RelayHooks, WorkerHooks
from outbox_relay.observability.http import HttpConfig
from outbox_relay.observability.refresh import GaugeRefresher
from outbox_relay.prune import RetentionConfig, prune_periodically
from outbox_relay.queue import ConsumerStats, Diagnosable, Queue
from outbox_relay.queue.backends import QueueBackend, QueueOptions, from_url
from outbox_relay.relay import ActiveTask, Relay, RelayConfig
from outbox_relay.relay.report import report_progress
from outbox_relay.replication import ReplicationConfig
from outbox_relay.settings import Settings, env_name
from outbox_relay.sinks import Routing, enable_routes
from outbox_relay.worker import WorkerConfig, run_worker

logger = logging.getLogger(__name__)

# -- narrow configs ----------------------------------------------------------------------------------


def relay_config(settings: Settings, queue: ServiceQueue) -> RelayConfig:
    """What the relay (`run`) needs."""
    return RelayConfig(
        database_url=settings.require_database_url(),
        queue_name=queue.name,
        sweep_interval=settings.sweep_interval,
        requeue_after=settings.requeue_after,
        batch_size=settings.batch_size,
        max_queue_depth=settings.max_queue_depth,
        hand_over_interval=settings.hand_over_interval,
    )


def worker_config(settings: Settings) -> WorkerConfig:
    """What the worker's row processor needs."""
    return WorkerConfig(
        database_url=settings.require_database_url(),
        concurrency=settings.worker_concurrency,
        job_timeout=settings.job_timeout,
        max_attempts=settings.max_attempts,
        retry_backoff=settings.retry_backoff,
        retry_backoff_max=settings.retry_backoff_max,
    )


def _primary_url(settings: Settings) -> str | None:
    """PRIMARY_URL when set (doctor and the relay's gauges read the primary only then)."""
    return settings.primary_url.get_secret_value() if settings.primary_url is not None else None


def retention_config(settings: Settings) -> RetentionConfig | None:
    """The relay's periodic prune, when RETENTION is set."""
    if settings.retention is None:
        return None
    return RetentionConfig(settings.retention, settings.prune_interval, settings.prune_batch_size)


async def service_queue(settings: Settings, stop: asyncio.Event) -> ServiceQueue:
    """The service database's queue (QUEUE_NAME, else derived from the database) and identity,
    for a service: it waits for the database for ever (CancelledError once ``stop`` is set)."""
    url = settings.require_database_url()
    conn = await connect_retrying(url, what="the service database", give_up_after=None, stop=stop)
    try:
        queue = await resolve_queue(conn, settings.queue_name)
    finally:
        await conn.close()
    logger.info(
        "queue of the service database",
        extra={"queue": queue.name, "derived": queue.derived, "database": queue.database.describe()},
    )
    return queue


def queue_options(settings: Settings, queue: ServiceQueue) -> QueueOptions:
    """What the queue backend is told, producer and consumer side."""
    return QueueOptions(
        queue_name=queue.name,
        namespace=queue.namespace,
        identity=queue.database.token,
        batch_size=settings.job_batch_size,
        concurrency=settings.worker_concurrency,
        poll_delay=settings.worker_poll_delay,
        job_timeout=settings.job_timeout,
        idle_wait=settings.worker_idle_wait,
    )


def queue_backend(settings: Settings, queue: ServiceQueue) -> QueueBackend:
    """The queue backend ``REDIS_URL``'s scheme picks (``redis://`` → arq, ``memory://`` → in memory)."""
    return _backend(settings, queue_options(settings, queue))


def _backend(settings: Settings, options: QueueOptions) -> QueueBackend:
    return from_url(settings.redis_url.get_secret_value(), options, variable=env_name("redis_url"))


def routing(settings: Settings) -> Routing:
    """ROUTES and what the sinks of a worker share."""
    return Routing(
        settings.routes,
        settings.require_database_url(),
        settings.worker_concurrency,
        in_flight=settings.sink_in_flight,
        job_timeout=settings.job_timeout,
    )


def replication_config(settings: Settings) -> ReplicationConfig:
    """What `subscribe` and `unsubscribe` need: both URLs, how the service database's server reaches
    the primary, the subscription's name when set."""
    primary_url = settings.require_primary_url()
    conninfo = settings.subscription_conninfo
    return ReplicationConfig(
        primary_url=primary_url,
        database_url=settings.require_database_url(),
        conninfo=primary_url if conninfo is None else conninfo.get_secret_value(),
        subscription_name=settings.subscription_name,
    )


def http_config(settings: Settings) -> HttpConfig | None:
    """Where `run` and `worker` serve /healthz, /readyz and /metrics (None: HTTP_PORT not set)."""
    if settings.http_port is None:
        return None
    return HttpConfig(settings.http_host, settings.http_port, env_name("http_port"))


def doctor_config(settings: Settings, registry: HandlerRegistry) -> DoctorConfig:
    """What `doctor` needs."""

    def diagnostics(queue_name: str) -> Diagnosable:
        return _backend(settings, QueueOptions(queue_name, job_namespace(queue_name))).diagnostics()

    return DoctorConfig(
        database_url=settings.require_database_url(),
        queue=diagnostics,
        queue_name=settings.queue_name,
        requeue_after=settings.requeue_after,
        primary_url=_primary_url(settings),
        subscription_name=settings.subscription_name,
        plugins=registry.plugins(),
    )


# -- plugins -----------------------------------------------------------------------------------------


def plugins(
    settings: Settings,
    registry: HandlerRegistry | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> HandlerRegistry:
    """The handlers: installed plugins plus HANDLER_MODULES, loaded once, each plugin's own settings
    read (``overrides``: values by plugin name, over the environment's); then ROUTES' sinks."""
    target = default_registry if registry is None else registry
    try:
        loaded = load_plugins(target, settings.handler_modules)
    except PluginError as exc:
        raise SettingsError(env_name("handler_modules"), str(exc)) from None
    loaded.read_settings(overrides)
    if settings.routes:
        enable_routes(loaded, routing(settings), variable=env_name("routes"))
    return loaded


# -- services ----------------------------------------------------------------------------------------


@dataclass
class RelayProcess:
    """`run`: the relay, its progress report and (while active) its retention loop."""

    relay: Relay
    queue: Queue
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


async def relay_process(
    settings: Settings, stop: asyncio.Event, *, health: Health | None = None, metrics: Metrics | None = None
) -> RelayProcess:
    """Compose `run` from ``settings`` (with ``health``/``metrics`` when HTTP is served), once the
    service database told its queue (CancelledError when ``stop`` is set before)."""
    hooks = RelayHooks(health, metrics, deadline=max(30.0, 3 * settings.sweep_interval))
    with hooks.waiting("the service database"):
        resolved = await service_queue(settings, stop)
    config = relay_config(settings, resolved)
    backend = queue_backend(settings, resolved)
    queue = backend.producer()
    retention = retention_config(settings)
    while_active: list[tuple[str, ActiveTask]] = []
    if retention is not None:

        async def prune(pool: Pool, fence: Callable[[], Awaitable[None]]) -> None:
            await prune_periodically(pool, retention, stop, on_pruned=relay.stats.count_pruned, fence=fence)

        while_active.append(("relay.prune", prune))
    if metrics is not None:
        primary_url = _primary_url(settings)

        async def gauges(pool: Pool, fence: Callable[[], Awaitable[None]]) -> None:
            assert metrics is not None
            await GaugeRefresher(primary_url, pool, metrics, queue.depth, hooks, server=backend.name).run(
                stop
            )

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
    """`worker`: run until ``stop`` (or, with ``burst``, until the queue is empty), once the service
    database told its queue (CancelledError when ``stop`` is set before)."""
    hooks = WorkerHooks(health, metrics, kinds=handlers.kinds())
    with hooks.waiting("the service database"):
        resolved = await service_queue(settings, stop)
    consumer = queue_backend(settings, resolved).consumer()
    try:
        return await run_worker(worker_config(settings), consumer, handlers, stop, burst=burst, hooks=hooks)
    finally:
        await consumer.close()
