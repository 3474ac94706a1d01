"""The arq job: apply one outbox row exactly once.

One transaction locks the row (``FOR UPDATE``), runs the kind's handler and
moves the row to ``finished``. A second delivery of the same job waits for the
lock, then finds the row finished and changes nothing. A permanent error turns
the row ``failed`` at once; a transient one counts an attempt and is retried
with backoff by arq (``Retry``) until MAX_ATTEMPTS, then the row turns ``failed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq import Retry

from outbox_relay.backoff import describe, is_denied
from outbox_relay.db import Pool
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.settings import Settings
from outbox_relay.sql import query

logger = logging.getLogger(__name__)

#: Key of the :class:`RowProcessor` in arq's worker context.
CONTEXT_KEY = "outbox_relay"


class RowProcessor:
    """Applies outbox rows with the registered handlers."""

    def __init__(self, settings: Settings, pool: Pool, registry: HandlerRegistry) -> None:
        self.settings = settings
        self.pool = pool
        self.registry = registry
        self._unrecorded = 0
        self._unrecorded_logged_at = -1e9

    async def process(self, row_id: int, job_try: int = 1, kind: str | None = None) -> str:
        """Apply row ``row_id``; returns what happened (``finished``, ``failed``, ``duplicate``,
        ``missing``) or raises :class:`arq.Retry` for a transient failure.

        ``kind`` (carried in the job) selects the kind's one-statement fast path,
        if it has one; the general path below handles everything else.
        """
        timeout = self.settings.job_timeout
        try:
            async with asyncio.timeout(timeout):
                fast_path = self.registry.fast_path(kind)
                if fast_path is not None and await fast_path(self.pool, row_id):
                    return "finished"
                return await self._apply(row_id)
        except PermanentError as exc:
            error, permanent = str(exc), True
        except Exception as exc:  # transient: database, Redis, timeouts, handler bugs
            error, permanent = describe(exc), False

        try:
            async with asyncio.timeout(timeout):
                if permanent:
                    await self.pool.execute(query("fail_row"), row_id, error)
                    logger.warning("row failed permanently", extra={"row_id": row_id, "error": error})
                    return "failed"
                row = await self.pool.fetchrow(
                    query("record_transient_failure"), row_id, error, self.settings.max_attempts
                )
        except Exception as exc:
            # Could not even record the attempt (the database is away): retry later,
            # without counting it. Every job hits this during an outage: one line a
            # second says so, with how many were put off since the last one.
            delay = self._backoff(job_try)
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
            raise Retry(defer=delay) from None
        if row is None:
            return "duplicate"  # finished or failed meanwhile
        if row["status"] == "failed":
            logger.warning(
                "row failed after its last attempt",
                extra={"row_id": row_id, "attempts": row["attempts"], "error": error},
            )
            return "failed"
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
        raise Retry(defer=delay)

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
            await conn.execute(query("finish_row"), row_id)
        return "finished"

    def _backoff(self, attempts: int) -> float:
        base = self.settings.retry_backoff
        return float(min(self.settings.retry_backoff_max, base * 2 ** max(0, attempts - 1)))


async def process_row(ctx: dict[str, Any], row_id: int, kind: str | None = None) -> str:
    """The arq function (registered as ``outbox_relay.process_row``)."""
    processor: RowProcessor = ctx[CONTEXT_KEY]
    return await processor.process(row_id, int(ctx.get("job_try", 1)), kind)
