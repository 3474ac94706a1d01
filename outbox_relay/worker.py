"""The worker service (`worker`): an arq worker that applies outbox rows.

arq settings, chosen for fast recovery (see the field notes in the README):

* ``keep_result = 0``: arq keeps no results, so no job id is blocked after its
  job ended (the default blocks an id for an hour, and a terminal failure uses
  the worker-level value whatever the function says).
* function ``timeout = JOB_TIMEOUT + 5``: our own timeout (JOB_TIMEOUT) fires
  first and counts a transient attempt; arq's is only a backstop, because arq
  treats a timeout as terminal. It also sets the in-progress key's life
  (timeout + 10 s): a SIGKILLed worker's job is run by another worker after
  JOB_TIMEOUT + 15 s (25 s by default) instead of arq's default 310 s.
* ``poll_delay = WORKER_POLL_DELAY`` (10 ms): arq polls Redis; its default of
  0.5 s would be the latency floor.
* ``max_tries = 1000``: attempts are counted in the database (MAX_ATTEMPTS);
  arq's own count only bounds retries that could not be recorded there.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import random
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.typing import WorkerCoroutine
from arq.worker import Worker, func
from redis.exceptions import RedisError

from outbox_relay.backoff import Backoff, describe, retry, stopped_within
from outbox_relay.db import Pool, create_pool
from outbox_relay.exceptions import SettingsError
from outbox_relay.handlers import HandlerRegistry, registry
from outbox_relay.jobs import FUNCTION_NAME, redis_client
from outbox_relay.migrate import check_schema
from outbox_relay.observability import Health, Metrics
from outbox_relay.observability.hooks import WorkerHooks
from outbox_relay.settings import Settings, env_name
from outbox_relay.tasks import CONTEXT_KEY, RowProcessor, process_row

logger = logging.getLogger(__name__)

ARQ_MAX_TRIES = 1000
#: Key of the :class:`WorkerHooks` in arq's worker context.
HOOKS_KEY = "outbox_relay.hooks"
#: Extra seconds arq's own job timeout allows beyond JOB_TIMEOUT.
ARQ_TIMEOUT_MARGIN = 5.0


@dataclass
class WorkerStats:
    """What one worker process did."""

    complete: int = 0
    failed: int = 0
    retried: int = 0


def load_handler_modules(settings: Settings) -> None:
    """Import the modules of HANDLER_MODULES so that they register their handlers."""
    for name in settings.handler_modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SettingsError(env_name("handler_modules"), f"cannot import {name!r}: {exc}") from None


class OutboxWorker(Worker):
    """arq's Worker, skipping the jobs it runs itself and claiming the rest of each
    read window in random order.

    arq workers read the same head of the queue and claim its jobs one by one
    (WATCH/MULTI per job): with several workers, all but one pay round trips
    for jobs another has just taken. Shuffling the window makes concurrent
    workers mostly pick different jobs. Order within a window of
    ``queue_read_limit`` jobs is not kept (outbox_relay promises no order).
    """

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # The jobs this worker is running stay in the queue until they finish, so
        # every poll reads them again; arq would spend a WATCH/MULTI round trip on
        # each before skipping it. Skip them here, for free.
        running = self.tasks
        fresh = [job_id for job_id in job_ids if job_id.decode() not in running]
        random.shuffle(fresh)
        await super().start_jobs(fresh)

    async def heart_beat(self) -> None:
        """Called by arq once per poll: our liveness heartbeat too (see :class:`WorkerHooks`)."""
        await super().heart_beat()
        hooks = self.ctx.get(HOOKS_KEY) if self.ctx else None
        if hooks is not None:
            hooks.beat()


def build_arq_worker(
    settings: Settings,
    redis: ArqRedis,
    ctx: dict[str, Any],
    *,
    burst: bool = False,
    coroutine: WorkerCoroutine = process_row,
    worker_class: type[Worker] = OutboxWorker,
) -> Worker:
    """An arq Worker with outbox_relay's settings (see the module docstring).

    The bench builds its no-op ceiling with the same function, passing a no-op
    ``coroutine`` and arq's plain ``Worker``, so that both run identical settings.
    """
    function = func(
        coroutine,
        name=FUNCTION_NAME,
        timeout=settings.job_timeout + ARQ_TIMEOUT_MARGIN,
        keep_result=0,
        max_tries=ARQ_MAX_TRIES,
    )
    return worker_class(
        functions=[function],
        queue_name=settings.queue_name,
        redis_pool=redis,
        burst=burst,
        max_jobs=settings.worker_concurrency,
        job_timeout=settings.job_timeout + ARQ_TIMEOUT_MARGIN,
        keep_result=0,
        poll_delay=settings.worker_poll_delay,
        max_tries=ARQ_MAX_TRIES,
        handle_signals=False,
        health_check_interval=60,
        ctx=ctx,
        log_results=False,
    )


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    burst: bool = False,
    handlers: HandlerRegistry = registry,
    health: Health | None = None,
    metrics: Metrics | None = None,
) -> WorkerStats:
    """Run until ``stop`` is set (or, with ``burst``, until the queue is empty).

    An unreachable database or Redis, at start or later, is retried forever
    with capped backoff, one log line per attempt.
    """
    load_handler_modules(settings)
    database_url = settings.require_database_url()
    pool = await create_pool(
        database_url,
        max_size=settings.worker_concurrency,
        application_name="outbox_relay.worker",
    )
    redis = redis_client(
        settings.redis_url.get_secret_value(),
        queue_name=settings.queue_name,
        max_connections=settings.worker_concurrency + 10,
    )
    stats = WorkerStats()
    hooks = WorkerHooks(health, metrics, kinds=handlers.kinds())
    try:
        with hooks.waiting("the service database and Redis"):
            await _wait_until_ready(pool, redis, stop)
        hooks.ready()
        processor = RowProcessor(settings, pool, handlers)
        backoff = Backoff(0.2, 5.0)
        logger.info(
            "worker started",
            extra={
                "queue": settings.queue_name,
                "concurrency": settings.worker_concurrency,
                "kinds": ",".join(handlers.kinds()),
                "burst": burst,
            },
        )
        while not stop.is_set():
            worker = build_arq_worker(
                settings,
                redis,
                {CONTEXT_KEY: processor, HOOKS_KEY: hooks},
                burst=burst,
                coroutine=hooks.instrument(process_row),
            )
            finished = await _run_until_stopped(worker, stop, settings.job_timeout + 5)
            stats.complete += worker.jobs_complete
            stats.failed += worker.jobs_failed
            stats.retried += worker.jobs_retried
            if finished is None:
                break  # stopped, or a burst ran dry
            delay = backoff.next_delay()
            hooks.not_ready(f"lost the queue ({describe(finished)}); restarting")
            logger.warning(
                "worker lost its queue, restarting",
                extra={"error": describe(finished), "retry_in": round(delay, 2)},
            )
            await stopped_within(stop, delay)
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
    finally:
        with contextlib.suppress(Exception):
            await redis.aclose(close_connection_pool=True)
        try:
            await asyncio.wait_for(pool.close(), 5.0)
        except Exception:
            pool.terminate()
    logger.info("worker stopped", extra={"complete": stats.complete, "retried": stats.retried})
    return stats


async def _wait_until_ready(pool: Pool, redis: ArqRedis, stop: asyncio.Event) -> None:
    async def database_ready() -> None:
        async with pool.acquire() as conn:
            await check_schema(conn)

    await retry(
        database_ready,
        what="the service database",
        logger=logger,
        give_up_after=None,
        stop=stop,
        backoff=Backoff(0.2, 5.0),
    )

    async def redis_ready() -> None:
        await redis.ping()

    await retry(
        redis_ready,
        what="Redis",
        logger=logger,
        give_up_after=None,
        stop=stop,
        backoff=Backoff(0.2, 5.0),
        retry_on=(RedisError, OSError, TimeoutError),
    )


async def _run_until_stopped(
    worker: Worker, stop: asyncio.Event, drain_timeout: float
) -> BaseException | None:
    """Run arq's main loop; returns its error, or None when stopped or a burst ended."""
    main = asyncio.create_task(worker.main(), name="worker.arq")
    stopper = asyncio.create_task(stop.wait(), name="worker.stop")
    try:
        await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if main.done():
        if main.cancelled():
            return None
        exc = main.exception()
        if exc is None:
            return None
        await _drain(worker, drain_timeout)
        return exc
    # Stop: take no more jobs, let the running ones finish (a job cut off here
    # is run again elsewhere once its in-progress key expires).
    worker.allow_pick_jobs = False
    await _drain(worker, drain_timeout)
    await _cancel(main)
    return None


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for its end, cancelling again while it goes on.

    On Python 3.11 ``asyncio.wait_for``, which redis-py runs around every command
    it sends, swallows a cancellation that arrives as the command completes: arq's
    loop then carries on as if never cancelled, and one ``cancel()`` may never end it.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieve it: on stop, nothing is left to report


async def _drain(worker: Worker, timeout: float) -> None:
    running = [task for task in worker.tasks.values() if not task.done()]
    if running:
        await asyncio.wait(running, timeout=timeout)
