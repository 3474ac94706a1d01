"""The row processor: apply one outbox row exactly once, and say what became of it.

The common case is ONE statement: the core claims the row, the kind's plugin
applies its effect (:class:`~outbox_relay.handlers.FastPath`), the core
finishes the row. Anything else takes the general path: one transaction locks
the row (``FOR UPDATE``), runs the kind's handler and moves the row to
``finished``. A second delivery of the same job waits for the lock, then finds
the row finished and changes nothing. A permanent error turns the row ``failed``
at once; a transient one counts an attempt and asks the queue to run the job
again after a backoff, until MAX_ATTEMPTS, when the row turns ``failed``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from outbox_relay.db import Pool
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.logs import describe
from outbox_relay.queue import Job, Outcome
from outbox_relay.retry import is_denied
from outbox_relay.settings import WorkerConfig
from outbox_relay.sql import query, render

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

    async def __call__(self, job: Job) -> Outcome:
        """The job function of the queue port (:data:`outbox_relay.queue.JobFunction`)."""
        return await self.process(job.row_id, job.delivery)

    async def process(self, row_id: int, delivery: int = 1) -> Outcome:
        """Apply row ``row_id``: ``finished``, ``failed``, ``duplicate``, ``missing``, or a retry."""
        timeout = self.config.job_timeout
        try:
            async with asyncio.timeout(timeout):
                if self._fast_path is not None and row_id in await self._apply_fast([row_id]):
                    return Outcome("finished")
                return Outcome(await self._apply(row_id))
        except PermanentError as exc:
            error, permanent = str(exc), True
        except Exception as exc:  # transient: database, timeouts, handler bugs
            error, permanent = describe(exc), False
        return await self._record_failure(row_id, delivery, error, permanent=permanent)

    async def _apply_fast(self, row_ids: list[int]) -> set[int]:
        assert self._fast_path is not None
        return {r["id"] for r in await self.pool.fetch(self._fast_path, row_ids)}

    async def _apply(self, row_id: int) -> str:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(query("claim_row"), row_id)
            if row is None:
                return "missing"  # pruned, or never there
            if row["status"] in ("finished", "failed"):
                return "duplicate"
            event = OutboxEvent.from_row(row)
            handler = self.registry.get(event.kind)
            await handler(conn, event)
            await conn.execute(self._finish_row, row_id)
        return "finished"

    async def _record_failure(self, row_id: int, delivery: int, error: str, *, permanent: bool) -> Outcome:
        try:
            async with asyncio.timeout(self.config.job_timeout):
                if permanent:
                    await self.pool.execute(query("fail_row"), row_id, error)
                    logger.warning(
                        "row failed permanently",
                        extra={"event": "row_failed", "row_id": row_id, "error": error},
                    )
                    return Outcome("failed")
                row = await self.pool.fetchrow(
                    query("record_transient_failure"), row_id, error, self.config.max_attempts
                )
        except Exception as exc:
            return self._unrecordable(row_id, delivery, error, exc)
        if row is None:
            return Outcome("duplicate")  # finished or failed meanwhile
        if row["status"] == "failed":
            logger.warning(
                "row failed after its last attempt",
                extra={"event": "row_failed", "row_id": row_id, "attempts": row["attempts"], "error": error},
            )
            return Outcome("failed")
        delay = self._backoff(row["attempts"])
        logger.info(
            "row attempt failed; retrying",
            extra={
                "row_id": row_id,
                "attempts": row["attempts"],
                "error": error,
                "retry_in": round(delay, 2),
            },
        )
        return Outcome.retry(delay)

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
