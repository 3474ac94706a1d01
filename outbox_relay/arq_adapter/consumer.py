"""The consumer side: an arq Worker that runs the worker's job function.

arq settings, chosen for fast recovery (see the field notes in the README):

* ``keep_result = 0``: arq keeps no results, so no job id is blocked after its
  job ended (the default blocks an id for an hour, and a terminal failure uses
  the worker-level value whatever the function says).
* function ``timeout = JOB_TIMEOUT + 5``: the processor's own timeout
  (JOB_TIMEOUT) fires first and counts a transient attempt; arq's is only a
  backstop, because arq treats a timeout as terminal. The in-progress key lives
  one second longer (arq's own default is timeout + 10 s): a SIGKILLed, frozen or
  partitioned worker's job is run by another worker after JOB_TIMEOUT + 6 s
  (16 s by default) instead of arq's 310 s.
* no polling on a timer: between polls a worker with a slot free, busy or
  not, blocks on the queue's wake-up list (the relay pushes one element per job
  it adds, settle.lua one per job it re-enqueues; BLPOP with a timeout of
  WORKER_IDLE_WAIT, shortened to the next deferred job's due time), so it costs
  no CPU while nothing arrives and starts a new job within a Redis round trip.
  Every job adds an element and every element popped makes a poll, so no job
  waits for a timer; WORKER_IDLE_WAIT bounds the wait if an element is ever
  lost (or a worker stopped after taking one). A poll that read a full window
  and took jobs from it polls again at once; a worker with every slot taken
  sleeps ``WORKER_POLL_DELAY`` (10 ms) and polls for a free one (taking a
  wake-up it could not act on would leave another worker asleep).
* claiming: one script call per poll for every job taken (claim.lua), where
  arq spends four round trips per job and a worker losing the race three.
* a job is a batch of rows (``outbox_relay.process_rows``, JSON, see
  enqueue.lua); after the processor ran it, one call (settle.lua) drops the
  markers of the rows that ended and enqueues the rows to retry, each alone
  (or the rows put off, together) as a new deferred job.
* ``max_tries = 1000``: attempts are counted in the database (MAX_ATTEMPTS);
  arq's own count only bounds retries that could not be recorded there.
* one clock: every score is written and compared by the Redis server's clock
  (``TIME`` inside enqueue.lua, settle.lua, claim.lua and due.lua), never by a
  host's: a worker (or relay) whose clock is off takes jobs as soon as they are
  due all the same. arq's own poll reads the due jobs by the worker's clock, so
  :meth:`OutboxWorker._poll_iteration` reads them through due.lua instead.
* every job carries the identity of the service database whose rows it holds
  (the keyword argument ``database``); a job of another database is not run but
  put back as it came, deferred by FOREIGN_JOB_DEFER (settle.lua: a new job
  holding the same rows, same deliveries, same identity), and the observer is
  told. Each worker announces its database in ``outbox_relay:workers:<queue>``
  (every ANNOUNCE_EVERY s, valid ANNOUNCE_TTL s; withdrawn on a clean stop), for
  `doctor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import random
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from arq.connections import ArqRedis
from arq.typing import WorkerCoroutine
from arq.worker import Worker, func
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from outbox_relay.arq_adapter.producer import (
    BATCH_FUNCTION_NAME,
    FUNCTION_NAME,
    JOB_TTL_MS,
    MARKER_PREFIX,
    redis_client,
    translated_errors,
    wake_key,
    workers_key,
)
from outbox_relay.lifecycle import cancel_and_wait, stopped_within
from outbox_relay.logs import describe
from outbox_relay.queue import FOREIGN_JOB_DEFER, ConsumerObserver, ConsumerStats, Job, JobFunction, Outcome
from outbox_relay.retry import Backoff, retry

logger = logging.getLogger(__name__)

ARQ_MAX_TRIES = 1000
#: Extra seconds arq's own job timeout allows beyond JOB_TIMEOUT.
ARQ_TIMEOUT_MARGIN = 5.0
#: Extra seconds a job stays in progress (claimed) beyond arq's own timeout.
IN_PROGRESS_MARGIN = 1.0
#: Key of the job function in arq's worker context.
CONTEXT_KEY = "outbox_relay.job_function"
#: Key of the consumer's observer (health) in arq's worker context.
OBSERVER_KEY = "outbox_relay.observer"
#: Key of the registered settle.lua in arq's worker context.
SETTLE_KEY = "outbox_relay.settle"
#: Key of the stats object in arq's worker context.
STATS_KEY = "outbox_relay.stats"
#: Key of the service database's identity in arq's worker context.
IDENTITY_KEY = "outbox_relay.identity"
#: Seconds between two announcements of a worker's database in its queue's workers set, and
#: how long one is valid (a worker stopping cleanly withdraws it).
ANNOUNCE_EVERY, ANNOUNCE_TTL = 10.0, 30.0

_SETTLE = (Path(__file__).resolve().parent / "settle.lua").read_text()
_CLAIM = (Path(__file__).resolve().parent / "claim.lua").read_text()
_DUE = (Path(__file__).resolve().parent / "due.lua").read_text()
#: The errors of a Redis that does not answer (yet): waited out, not raised.
_REDIS_DOWN = (RedisError, OSError, TimeoutError)


def deserialize_job(data: bytes) -> dict[str, Any]:
    """Batch jobs are JSON (written by Lua); 0.1.0's one-row jobs and arq's own are pickles."""
    if data[:1] == b"{":
        decoded: dict[str, Any] = json.loads(data)
        return decoded
    unpickled: dict[str, Any] = pickle.loads(data)  # noqa: S301 - our own Redis, arq's format
    return unpickled


@dataclass(frozen=True)
class ConsumerConfig:
    """What the arq worker needs: Redis (a secret: never logged), queue, concurrency, timings."""

    redis_url: str
    queue_name: str
    concurrency: int
    poll_delay: float
    job_timeout: float
    #: Longest block on the wake-up list while idle (seconds).
    idle_wait: float = 1.0
    #: The service database's identity: a job carrying another is refused ("": no check).
    identity: str = ""

    def __repr__(self) -> str:
        return f"ConsumerConfig(queue_name={self.queue_name!r}, concurrency={self.concurrency})"


class OutboxWorker(Worker):
    """arq's Worker, woken by the relay instead of polling while idle, skipping the jobs
    it runs itself and claiming the rest of each read window in one call.

    arq workers read the same head of the queue and claim its jobs one by one
    (WATCH/MULTI per job, four round trips): with several workers, all but one
    pay round trips for jobs another has just taken. Here a poll claims every
    job it can take in one script call (claim.lua), in random order, so that
    workers short of slots take different jobs. Order within a window of
    ``queue_read_limit`` jobs is not kept (outbox_relay promises no order).
    """

    idle_wait: float = 1.0
    _started_now: int = 0
    _read_now: int = 0
    _next_announce: float = 0.0
    #: Whether this poll looked at the queue, and when (event loop time) the next job not yet
    #: due is due as it read it (None: none is).
    _looked: bool = False
    _next_due: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The scripts, registered once (not per poll or per batch): claim.lua here,
        # settle.lua for the batch function through the context.
        self._claim = self.pool.register_script(_CLAIM)
        self._due = self.pool.register_script(_DUE)
        self.ctx[SETTLE_KEY] = self.pool.register_script(_SETTLE)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim up to the free slots' worth of ``job_ids`` in one call (claim.lua) and run them.

        The jobs this worker runs stay in the queue until they finish, so every
        poll reads them again: they are skipped here, for free. The claim itself
        is arq's (due, not in progress; then the in-progress key), made atomic by
        the script instead of by WATCH/MULTI per job.
        """
        self._read_now = len(job_ids)
        running = self.tasks
        fresh = [job_id for job_id in (b.decode() for b in job_ids) if job_id not in running]
        random.shuffle(fresh)
        fresh = fresh[: max(0, self.max_jobs - self.job_counter)]
        self._started_now = 0
        if not fresh:
            return
        ttl_ms = int(self.in_progress_timeout_s * 1000)
        reply = await self._claim(keys=[self.queue_name], args=[ttl_ms, *fresh])
        for job_id_b, score in zip(reply[::2], reply[1::2], strict=True):
            await self.sem.acquire()  # free: no more were claimed than slots were free
            self.job_counter += 1
            job_id = job_id_b.decode() if isinstance(job_id_b, bytes) else str(job_id_b)
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
            self._started_now += 1

    async def _poll_iteration(self) -> None:
        """arq's poll, with the due jobs read by the Redis server's clock (due.lua): arq reads
        ``ZRANGEBYSCORE queue -inf <this host's now>``. Burst limit, aborts, the cleanup of
        ended tasks and the heart beat are arq's own."""
        count = self.queue_read_limit
        if self.burst and self.max_burst_jobs >= 0:
            remaining = self.max_burst_jobs - self._jobs_started()
            if remaining < 1:
                return
            count = min(remaining, count)
        if self.allow_pick_jobs and self.job_counter < self.max_jobs:
            upcoming, job_ids = await self._look(count)
            self._looked = True
            self._next_due = None if upcoming is None else asyncio.get_running_loop().time() + upcoming
            await self.start_jobs(job_ids)
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # arq's way: an error of run_job surfaces here
        await self.heart_beat()

    async def _look(self, count: int) -> tuple[float | None, list[bytes]]:
        """Seconds until the next job not yet due is due (None: none), and up to ``count`` due
        job ids, both by the Redis server's clock (due.lua)."""
        reply = await self._due(keys=[self.queue_name], args=[self._queue_read_offset, count])
        wait_ms = int(reply[0])
        return (None if wait_ms < 0 else wait_ms / 1000), [bytes(job_id) for job_id in reply[1:]]

    async def heart_beat(self) -> None:
        """Called by arq once per poll: the worker's liveness beat too (a poll got through)."""
        await super().heart_beat()
        await self.announce()
        observer: ConsumerObserver | None = (self.ctx or {}).get(OBSERVER_KEY)
        if observer is not None:
            observer.beat()

    async def announce(self) -> None:
        """Every ANNOUNCE_EVERY s: this worker's database in the queue's workers set (for `doctor`),
        valid for ANNOUNCE_TTL s."""
        identity = self.ctx.get(IDENTITY_KEY) or ""
        now = asyncio.get_running_loop().time()
        if not identity or now < self._next_announce:
            return
        self._next_announce = now + ANNOUNCE_EVERY
        seconds, micros = await self.pool.time()  # the server's clock: doctor compares on another host
        key, now_ms = workers_key(self.queue_name), int(seconds) * 1000 + int(micros) // 1000
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", now_ms)
            pipe.zadd(key, {identity: now_ms + int(ANNOUNCE_TTL * 1000)})
            pipe.pexpire(key, int(ANNOUNCE_TTL * 1000))
            await pipe.execute()

    async def main(self) -> None:
        """arq's main loop, with a block on the wake-up list in place of each idle poll."""
        assert self._pool is not None, "built with a Redis pool"
        self.ctx["redis"] = self.pool
        wake = wake_key(self.queue_name)
        while True:
            self._started_now = self._read_now = 0
            self._looked = False
            await self._poll_iteration()
            if self.burst and await self.pool.zcard(self.queue_name) == 0:
                await asyncio.gather(*self.tasks.values())
                return
            if not self.allow_pick_jobs or self.job_counter >= self.max_jobs:
                await asyncio.sleep(self.poll_delay_s)  # no slot free: poll again for one
            elif self._read_now < self.queue_read_limit or self._started_now == 0:
                await self._wait_for_wake_up(wake)
            # else: the poll read a full window and took jobs from it; more may be due: poll again

    async def _wait_for_wake_up(self, wake: str) -> None:
        """Block until the relay adds a job, the next deferred job is due, or ``idle_wait``
        (when the next one is due: as the poll just read it, else a look of its own)."""
        timeout = self.idle_wait
        if self._looked:
            upcoming = None if self._next_due is None else self._next_due - asyncio.get_running_loop().time()
        else:
            upcoming, _ = await self._look(0)
        if upcoming is not None:
            timeout = min(timeout, max(0.0, upcoming))
        await self._block(wake, timeout)

    async def _block(self, wake: str, timeout: float) -> None:
        """Wait for the relay's next wake-up element, ``timeout`` seconds at most."""
        if timeout <= 0.001:
            return
        # Redis takes a fractional timeout; redis-py's annotation says int.
        await cast(Awaitable[Any], self.pool.blpop([wake], timeout=timeout))  # type: ignore[arg-type]


async def _run_batch(ctx: dict[str, Any], rows: list[list[Any]], database: str | None = None) -> str:
    """The arq function of a batch job (``outbox_relay.process_rows``): apply the rows,
    then drop the markers of those that ended and schedule the others again.

    ``database``: the identity of the service database whose rows these are; a job of
    another database than this worker's is put back untouched (see the module docstring)."""
    function: JobFunction = ctx[CONTEXT_KEY]
    own: str = ctx.get(IDENTITY_KEY) or ""
    extra = int(ctx.get("job_try", 1)) - 1  # arq ran this job before (its worker died)
    jobs = [Job(int(row_id), int(delivery) + extra) for row_id, _marker, delivery in rows]
    if database and own and database != own:
        back = [Outcome("foreign", FOREIGN_JOB_DEFER, counted=False) for _ in jobs]
        settle = ctx[SETTLE_KEY]
        await _settle(settle, ctx["queue_name"], ctx["job_id"], rows, jobs, back, database, alone=False)
        observer: ConsumerObserver | None = ctx.get(OBSERVER_KEY)
        if observer is not None:
            observer.foreign_job(database, own)
        return "refused: another database's job"
    outcomes = await function(jobs)
    stats: ConsumerStats | None = ctx.get(STATS_KEY)
    if stats is not None:
        stats.rows += len(jobs)
        # arq counts only its own retries (Retry raised); a batch's are new jobs (settle.lua)
        stats.retried += sum(1 for outcome in outcomes if outcome.retry_in is not None and outcome.counted)
    await _settle(ctx[SETTLE_KEY], ctx["queue_name"], ctx["job_id"], rows, jobs, outcomes, database or own)
    return "done"


async def _settle(
    script: AsyncScript,
    queue_name: str,
    own_id: str,
    rows: list[list[Any]],
    jobs: Sequence[Job],
    outcomes: Sequence[Outcome],
    identity: str,
    *,
    alone: bool = True,
) -> None:
    """Drop the markers of the rows that ended; schedule the others again (``alone``: a counted
    retry as a job of its own), as jobs carrying ``identity``."""
    done: list[str] = []
    groups: dict[float, list[list[Any]]] = {}
    for (row_id, marker, _), job, outcome in zip(rows, jobs, outcomes, strict=True):
        if outcome.retry_in is None:
            done.append(marker)
        else:
            delivery = job.delivery + 1 if outcome.counted else job.delivery
            groups.setdefault(outcome.retry_in, []).append([row_id, marker, delivery])
    again = []
    for delay, group in groups.items():
        # A counted retry runs alone: it never holds back (or re-applies) another row.
        chunks = [[row] for row in group] if delay > 0 and alone else [group]
        for chunk in chunks:
            again_id = f"{own_id.rsplit(':again-', 1)[0]}:again-{uuid.uuid4().hex[:12]}"
            again.append({"id": again_id, "defer_ms": int(delay * 1000), "rows": chunk})
    plan = json.dumps({"done": done, "again": again})
    async with translated_errors():
        await script(
            keys=[queue_name, wake_key(queue_name)],
            args=[own_id, JOB_TTL_MS, 0, BATCH_FUNCTION_NAME, plan, identity],
        )


async def _run_job(ctx: dict[str, Any], row_id: int, *_legacy: Any) -> str:
    """The arq function of 0.1.0's one-row jobs (``outbox_relay.process_row``, still in
    a queue after an upgrade; they also carry the row's kind, no longer needed): a batch
    of one through the batch door. 0.1.0's job id is the row's id in the queue, so its
    marker is :data:`MARKER_PREFIX` + that id; a retry becomes a batch job holding it."""
    return await _run_batch(ctx, [[row_id, MARKER_PREFIX + ctx["job_id"], 1]])


def build_arq_worker(
    config: ConsumerConfig,
    redis: ArqRedis,
    ctx: dict[str, Any],
    *,
    burst: bool = False,
    coroutine: WorkerCoroutine | None = None,
    worker_class: type[Worker] = OutboxWorker,
) -> Worker:
    """An arq Worker with outbox_relay's settings (see the module docstring).

    ``coroutine`` (registered under the one-row name) and ``worker_class`` (e.g.
    arq's plain ``Worker``) build another worker with identical arq settings: the
    bench's no-op ceiling (``python -m bench.noop_worker``) is built so.
    """
    timeout = config.job_timeout + ARQ_TIMEOUT_MARGIN
    coroutines: dict[str, WorkerCoroutine] = (
        {FUNCTION_NAME: coroutine}
        if coroutine is not None
        else {FUNCTION_NAME: _run_job, BATCH_FUNCTION_NAME: _run_batch}
    )
    functions = [
        func(c, name=name, timeout=timeout, keep_result=0, max_tries=ARQ_MAX_TRIES)
        for name, c in coroutines.items()
    ]
    worker = worker_class(
        functions=functions,
        queue_name=config.queue_name,
        redis_pool=redis,
        burst=burst,
        max_jobs=config.concurrency,
        job_timeout=timeout,
        keep_result=0,
        poll_delay=config.poll_delay,
        max_tries=ARQ_MAX_TRIES,
        handle_signals=False,
        health_check_interval=60,
        ctx={**ctx, "queue_name": config.queue_name, IDENTITY_KEY: config.identity},
        log_results=False,
        job_deserializer=deserialize_job,
    )
    # arq keeps a job in progress for its timeout + 10 s: a frozen or vanished worker's job would
    # wait that long for another worker. One second past arq's own timeout is enough (the job has
    # ended or been cut by then), so a row is delivered elsewhere JOB_TIMEOUT + 6 s after its worker
    # froze (its database claim expired a second after the job's deadline).
    worker.in_progress_timeout_s = timeout + IN_PROGRESS_MARGIN
    if isinstance(worker, OutboxWorker):
        worker.idle_wait = config.idle_wait
    return worker


class ArqConsumer:
    """:class:`outbox_relay.queue.Consumer` on arq."""

    server = "Redis"

    def __init__(self, config: ConsumerConfig) -> None:
        self.config = config
        self.redis = redis_client(
            config.redis_url, queue_name=config.queue_name, max_connections=config.concurrency + 10
        )

    async def wait_until_ready(self, stop: asyncio.Event) -> None:
        """Ping Redis until it answers, one log line per failed attempt."""

        async def ping() -> None:
            await self.redis.ping()

        await retry(ping, what="Redis", logger=logger, give_up_after=None, stop=stop, retry_on=_REDIS_DOWN)

    async def run(
        self,
        function: JobFunction,
        stop: asyncio.Event,
        *,
        burst: bool = False,
        observer: ConsumerObserver | None = None,
    ) -> ConsumerStats:
        """Run arq's loop until ``stop`` (or a burst ran dry); restart it after a Redis failure."""
        stats = ConsumerStats()
        backoff = Backoff()
        ctx = {CONTEXT_KEY: function, OBSERVER_KEY: observer}
        while not stop.is_set():
            worker = build_arq_worker(self.config, self.redis, {**ctx, STATS_KEY: stats}, burst=burst)
            finished = await _run_until_stopped(worker, stop, self.config.job_timeout + ARQ_TIMEOUT_MARGIN)
            stats.complete += worker.jobs_complete
            stats.failed += worker.jobs_failed
            stats.retried += worker.jobs_retried
            if finished is None:
                break  # stopped, or a burst ran dry
            delay = backoff.next_delay()
            if observer is not None:
                observer.not_ready(f"lost the queue ({describe(finished)}); restarting")
            logger.warning(
                "worker lost its queue, restarting",
                extra={"error": describe(finished), "retry_in": round(delay, 2)},
            )
            await stopped_within(stop, delay)
        await self._withdraw()
        return stats

    async def _withdraw(self) -> None:
        """Take this worker's database out of the queue's workers set (another worker of the same
        database announces it again within ANNOUNCE_EVERY s)."""
        if self.config.identity:
            with contextlib.suppress(*_REDIS_DOWN):
                await self.redis.zrem(workers_key(self.config.queue_name), self.config.identity)

    async def close(self) -> None:
        """Close the Redis connections."""
        with contextlib.suppress(Exception):
            await self.redis.aclose(close_connection_pool=True)


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
    await cancel_and_wait(main)
    return None


async def _drain(worker: Worker, timeout: float) -> None:
    running = [task for task in worker.tasks.values() if not task.done()]
    if running:
        await asyncio.wait(running, timeout=timeout)
