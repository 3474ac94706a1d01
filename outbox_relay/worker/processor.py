"""The row processor: apply a batch of outbox rows exactly once, and say what became of each.

The common case is ONE statement for the whole batch, committed once: the core
claims the rows (``FOR UPDATE``, in id order, so that concurrent batches never
deadlock on outbox rows), the kind's plugin
applies its effect (:class:`~outbox_relay.handlers.FastPath`), the core
finishes the row. Anything else takes the general path: one transaction locks
the row (``FOR UPDATE``), runs the kind's handler and moves the row to
``finished``. A second delivery of the same job waits for the lock, then finds
the row finished and changes nothing. A permanent error turns the row ``failed``
at once; a transient one counts an attempt and asks the queue to run the job
again after a backoff, until MAX_ATTEMPTS, when the row turns ``failed``.

Rows routed to sinks are delivered outside any transaction (a worker with
routes: :mod:`~outbox_relay.worker.deliveries`). Failures stay per row: the
rows the fast path did not finish take the general path one by one, each in
its own transaction; a failure fails or retries that row only, and a retry
never re-applies a finished row. A batch has JOB_TIMEOUT in all: the fast path
may use half of it; a row not started when it runs out is put off (run again at
once, the attempt not counted). A row of a kind this worker does not know is
handed back while another live worker routes it (a rolling change of ROUTES).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from outbox_relay.db import Pool
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError, TransientError, UnknownKindError
from outbox_relay.handlers import Delivery, HandlerRegistry
from outbox_relay.logs import describe
from outbox_relay.queue import Job, Outcome
from outbox_relay.retry import is_denied
from outbox_relay.sql import query, render
from outbox_relay.worker.deliveries import Deliveries, LiveRoutes

logger = logging.getLogger(__name__)


def compose_fast_path(registry: HandlerRegistry) -> str | None:
    """The one statement that claims, applies and finishes rows of every kind with a fast path."""
    fast_paths = list(registry.fast_paths().values())
    if not fast_paths:
        return None
    return render(
        query("fast_path"),
        effects=",\n".join(fp.ctes for fp in fast_paths),
        applied="\n    UNION ALL\n    ".join(fp.applied for fp in fast_paths),
        finished_columns=query("finished_columns"),
    )


def lock_timeout_setting(config: WorkerConfig) -> dict[str, str]:
    """The worker's connections wait for a row lock (a reservation another transaction
    holds) at most half of JOB_TIMEOUT: the effect's statement then fails
    (a transient error, retried after a backoff) and frees the outbox row."""
    return {"lock_timeout": str(max(100, int(config.job_timeout * 500)))}


@dataclass(frozen=True)
class WorkerConfig:
    """The worker's settings (the URL is a secret: left out of ``repr``)."""

    database_url: str = field(repr=False)
    concurrency: int
    job_timeout: float
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float


class RowProcessor:
    """Applies outbox rows with the registered handlers."""

    def __init__(self, config: WorkerConfig, pool: Pool, registry: HandlerRegistry) -> None:
        self.config = config
        self.pool = pool
        self.registry = registry
        self._fast_path = compose_fast_path(registry)
        self._finish_row = render(query("finish_row"), finished_columns=query("finished_columns"))
        self._unrecorded = 0
        self._unrecorded_logged_at = -1e9
        self._coalescer = _Coalescer(self._run_fast_path)
        #: Rows routed to sinks: claimed, delivered outside any transaction, finished (None: no routes).
        self._deliveries = Deliveries(pool, registry, self.record_failure) if registry.routes() else None
        #: For a row of a kind unknown here that another live worker routes: handed back.
        self._live_routes = LiveRoutes(pool)

    async def __call__(self, jobs: Sequence[Job]) -> list[Outcome]:
        """The job function of the queue port (:data:`outbox_relay.queue.JobFunction`): the one
        door, a one-row job is a batch of one."""
        return await self.process_batch(jobs)

    async def process_batch(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Apply a batch: one fast-path statement for all, then the deliveries (outside any
        transaction, all at once), then the general path row by row."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.job_timeout
        finished: dict[int, Outcome] = {}
        if self._fast_path is not None:
            try:
                async with asyncio.timeout(self.config.job_timeout / 2):
                    finished = await self._apply_fast(sorted({job.row_id for job in jobs}))
            except Exception as exc:  # a lock timeout, a deadlock, ...: each row on its own
                logger.info(
                    "batch fast path failed; rows one by one",
                    extra={"rows": len(jobs), "error": describe(exc)},
                )
        rest = [job for job in jobs if job.row_id not in finished]
        if rest and self._deliveries is not None:
            try:
                finished.update(await self._deliveries.run(rest, deadline))
            except Exception as exc:  # the database away: each row on its own (retried, not lost)
                logger.info(
                    "batch deliveries failed; rows one by one",
                    extra={"rows": len(rest), "error": describe(exc)},
                )
        outcomes: dict[int, Outcome] = {}
        for job in sorted(jobs, key=lambda j: j.row_id):
            if job.row_id in finished:
                outcomes[job.row_id] = finished[job.row_id]
                continue
            left = deadline - loop.time()
            if left <= 0:
                outcomes[job.row_id] = Outcome.put_off()
                continue
            outcomes[job.row_id] = await self.process(job.row_id, job.delivery, fast=False, timeout=left)
        return [outcomes[job.row_id] for job in jobs]

    async def process(
        self, row_id: int, delivery: int = 1, *, fast: bool = True, timeout: float | None = None
    ) -> Outcome:
        """Apply row ``row_id``: ``finished``, ``failed``, ``duplicate``, ``missing``, or a retry."""
        timeout = self.config.job_timeout if timeout is None else timeout
        failure: Exception
        try:
            async with asyncio.timeout(timeout):
                if fast and self._fast_path is not None:
                    finished = await self._apply_fast([row_id])
                    if row_id in finished:
                        return finished[row_id]
                return await self._apply(row_id)
        except _NoHandler as exc:  # another live worker's kind (a rolling change of ROUTES)?
            handed_back = await self._live_routes.hand_back(row_id, exc.kind)
            if handed_back is not None:
                return handed_back
            failure = exc
        except Exception as exc:  # the handler's verdict, or transient: database, timeouts, handler bugs
            failure = exc
        return await self.record_failure(row_id, delivery, failure)

    async def _apply_fast(self, row_ids: list[int]) -> dict[int, Outcome]:
        """The outcome of every row among ``row_ids`` the fast-path statement finished
        (it runs for the rows of every job that asked meanwhile, see :class:`_Coalescer`)."""
        return await self._coalescer.submit(row_ids)

    async def _run_fast_path(self, row_ids: list[int]) -> dict[int, Outcome]:
        """The one statement for ``row_ids``, committed once."""
        assert self._fast_path is not None
        return {
            r["id"]: Outcome("finished", kind=r["kind"], commit_to_finish=r["commit_to_finish"])
            for r in await self.pool.fetch(self._fast_path, row_ids)
        }

    async def _apply(self, row_id: int) -> Outcome:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(query("claim_row"), row_id)
            if row is None:
                return Outcome("missing")  # pruned, or never there
            if row["status"] in ("finished", "failed"):
                return Outcome("duplicate", kind=row["kind"])
            event = OutboxEvent.from_row(row)
            try:
                handler = self.registry.get(event.kind)
            except UnknownKindError as exc:
                raise _NoHandler(event.kind, str(exc)) from None
            if isinstance(handler, Delivery):  # the delivery step did not take it (failed): next time
                raise TransientError(f"kind {event.kind!r} is delivered outside a transaction; retrying")
            await handler(conn, event)
            done = await conn.fetchrow(self._finish_row, row_id)
        assert done is not None
        return Outcome("finished", kind=done["kind"], commit_to_finish=done["commit_to_finish"])

    async def record_failure(
        self, row_id: int, delivery: int, exc: Exception, token: int | None = None
    ) -> Outcome:
        """Record an attempt that raised ``exc`` (a claimed row's only while ``token`` is still its
        claim): permanently failed on a PermanentError, else retried (no sooner than a
        TransientError's ``retry_after``)."""
        permanent = isinstance(exc, PermanentError)
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
        error = str(exc) if isinstance(exc, (PermanentError, TransientError)) else describe(exc)
        max_attempts = 0 if permanent else self.config.max_attempts  # 0: failed now
        try:
            async with asyncio.timeout(self.config.job_timeout):
                row = await self.pool.fetchrow(query("record_failure"), row_id, error, max_attempts, token)
        except Exception as away:
            return self._unrecordable(row_id, delivery, error, away)
        if permanent:
            logger.warning(
                "row failed permanently", extra={"event": "row_failed", "row_id": row_id, "error": error}
            )
            return Outcome("failed", kind=None if row is None else row["kind"])
        if row is None:
            return Outcome("duplicate")  # finished or failed meanwhile
        if row["status"] == "failed":
            logger.warning(
                "row failed after its last attempt",
                extra={"event": "row_failed", "row_id": row_id, "attempts": row["attempts"], "error": error},
            )
            return Outcome("failed", kind=row["kind"])
        delay = max(self._backoff(row["attempts"]), retry_after or 0.0)
        logger.info(
            "row attempt failed; retrying",
            extra={
                "row_id": row_id,
                "attempts": row["attempts"],
                "error": error,
                "retry_in": round(delay, 2),
            },
        )
        return Outcome.retry(delay, row["kind"])

    def _unrecordable(self, row_id: int, delivery: int, error: str, exc: Exception) -> Outcome:
        """Could not even record the attempt (the database is away): retry later, without
        counting it. Every job hits this during an outage: one line a second says so,
        with how many were put off since the last one."""
        delay = self._backoff(delivery)
        self._unrecorded += 1
        now = time.monotonic()
        if now - self._unrecorded_logged_at >= 1.0:
            logger.warning(
                "row attempts failing and not recordable (%s); retrying",
                "permission denied" if is_denied(exc) else "database away?",
                extra={
                    "row_id": row_id,
                    "error": error,
                    "record_error": describe(exc),
                    "retry_in": round(delay, 2),
                    "jobs_put_off": self._unrecorded,
                },
            )
            self._unrecorded_logged_at = now
            self._unrecorded = 0
        return Outcome.retry(delay)

    def _backoff(self, attempts: int) -> float:
        base = self.config.retry_backoff
        return float(min(self.config.retry_backoff_max, base * 2 ** max(0, attempts - 1)))


class _NoHandler(UnknownKindError):
    """The row's kind has no handler and no route in this worker (the row is left untouched)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


#: Rows one merged fast-path statement takes at most.
MAX_MERGED_ROWS = 250
#: Fast-path statements a worker process runs at once (one waiting on a lock holds up no other).
MAX_STATEMENTS = 2


class _Coalescer:
    """Group commit for the fast path: the jobs that ask while statements run share the next.

    A job's rows run at once while fewer than :data:`MAX_STATEMENTS` statements
    are in flight (no wait at low load); jobs arriving while that many run and
    commit queue up, and the next statement takes all of their rows (up to
    :data:`MAX_MERGED_ROWS`), so that under load a worker commits once for many
    jobs instead of once per job. Each job gets the outcomes of its own rows; a
    row asked for twice (a second delivery in the same statement) is
    ``finished`` for the first asker and ``duplicate`` for the other. If the
    statement fails, every job in it gets the error (and takes the general path
    for its rows). A job that stops waiting (its timeout) leaves the statement
    running for the others.
    """

    def __init__(
        self,
        run: Callable[[list[int]], Awaitable[dict[int, Outcome]]],
        statements: int = MAX_STATEMENTS,
    ) -> None:
        self._run = run
        self._statements = statements
        self._waiting: deque[tuple[list[int], asyncio.Future[dict[int, Outcome]]]] = deque()
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, row_ids: list[int]) -> dict[int, Outcome]:
        future: asyncio.Future[dict[int, Outcome]] = asyncio.get_running_loop().create_future()
        self._waiting.append((row_ids, future))
        self._start()
        return await future

    def _start(self) -> None:
        while self._waiting and len(self._running) < self._statements:
            taken = self._take()
            if taken:
                task = asyncio.create_task(self._statement(taken), name="worker.fast_path")
                self._running.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start()

    def _take(self) -> list[tuple[list[int], asyncio.Future[dict[int, Outcome]]]]:
        taken: list[tuple[list[int], asyncio.Future[dict[int, Outcome]]]] = []
        rows = 0
        while self._waiting and (not taken or rows + len(self._waiting[0][0]) <= MAX_MERGED_ROWS):
            ids, future = self._waiting.popleft()
            if not future.done():  # its job stopped waiting
                taken.append((ids, future))
                rows += len(ids)
        return taken

    async def _statement(self, taken: list[tuple[list[int], asyncio.Future[dict[int, Outcome]]]]) -> None:
        try:
            finished = await self._run(sorted({i for ids, _ in taken for i in ids}))
        except BaseException as exc:  # cancelled too: no job may wait for ever
            error = exc if isinstance(exc, Exception) else RuntimeError("the fast path was cancelled")
            for _, future in taken:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        given: set[int] = set()
        for ids, future in taken:
            if future.done():  # its job stopped waiting
                continue
            mine: dict[int, Outcome] = {}
            for i in ids:
                if i in finished:
                    twice = i in given
                    mine[i] = Outcome("duplicate", kind=finished[i].kind) if twice else finished[i]
                    given.add(i)
            future.set_result(mine)
