"""Deliveries outside transactions (contract section 5.9): claim, deliver, finish.

The rows of a batch whose kind a sink delivers are claimed in ONE short
statement (each gets a fresh token and a deadline: the job's own), delivered
all at once with no transaction open (each sink keeps at most SINK_IN_FLIGHT in
flight), and the acknowledged ones finished in ONE short statement that lands
only for rows whose token is still this worker's. A worker that freezes or
loses its network mid-delivery holds no lock: once its claim has expired
another worker claims the row and delivers it again under the same delivery id
(the broker or consumer deduplicates by it); if the first one thaws, its finish
finds another token and changes nothing. A failure is recorded the same way,
fenced by the token.

A row of a kind this worker neither handles nor routes while another live
worker routes or handles it (a rolling change of ROUTES) is handed back
(:class:`LiveRoutes`, asked by the general path, which reads the row's kind
anyway): the row goes back to the queue untouched, its attempts not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from outbox_relay.db import Pool
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import UnknownKindError
from outbox_relay.handlers import Delivery, HandlerRegistry, PutOff
from outbox_relay.logs import describe
from outbox_relay.queue import Job, Outcome
from outbox_relay.sql import query, render

#: The processor's way of recording an attempt that raised (row id, delivery, the exception,
#: the claim's token that fences it).
RecordFailure = Callable[[int, int, Exception, int | None], Awaitable[Outcome]]


logger = logging.getLogger(__name__)

#: A worker seen within this many seconds is live (workers beat every WORKER_BEAT seconds).
LIVE_WORKER_SECONDS = 30.0
#: Seconds between two beats of a worker in outbox_relay.workers.
WORKER_BEAT = 10.0
#: How long a row handed back waits before the queue offers it again (seconds).
HAND_BACK_DELAY = 1.0
#: Least time a claim outlives its job's deadline (seconds): the finish statement's margin.
CLAIM_MARGIN = 1.0
#: How long the live workers' routes are cached (seconds).
ROUTES_CACHE = 2.0


class Deliveries:
    """The delivery step of a batch, for one worker process (one with routes)."""

    def __init__(self, pool: Pool, registry: HandlerRegistry, record_failure: RecordFailure) -> None:
        self.pool = pool
        self.registry = registry
        self.record_failure = record_failure
        self._finish = render(query("finish_claimed"), finished_columns=query("finished_columns"))

    async def run(self, jobs: Sequence[Job], deadline: float) -> dict[int, Outcome]:
        """The outcome of every row of ``jobs`` this step took: delivered (or failed), or found
        ended; the other rows (gone, of a kind with a handler or none) are the general path's."""
        kinds = {
            r["id"]: r["kind"] for r in await self.pool.fetch(query("kinds_of"), [j.row_id for j in jobs])
        }
        to_deliver: dict[int, Delivery] = {}
        for row_id, kind in kinds.items():
            with contextlib.suppress(UnknownKindError):
                work = self.registry.get(kind)
                if isinstance(work, Delivery):
                    to_deliver[row_id] = work
        if not to_deliver:
            return {}
        deliveries = {job.row_id: job.delivery for job in jobs if job.row_id in to_deliver}
        return await self._claim_and_deliver(to_deliver, deliveries, deadline)

    async def _claim_and_deliver(
        self, work: Mapping[int, Delivery], deliveries: Mapping[int, int], deadline: float
    ) -> dict[int, Outcome]:
        loop = asyncio.get_running_loop()
        ids = sorted(work)
        claim_for = max(0.0, deadline - loop.time()) + CLAIM_MARGIN
        claimed = {r["id"]: r for r in await self.pool.fetch(query("claim_deliveries"), ids, claim_for)}
        outcomes = await self._unclaimed([i for i in ids if i not in claimed])
        results = await asyncio.gather(
            *(self._deliver(work[i], row, deadline) for i, row in claimed.items()), return_exceptions=True
        )
        delivered = [i for i, result in zip(claimed, results, strict=True) if result is None]
        outcomes.update(await self._finish_delivered(delivered, claimed))
        for (row_id, row), result in zip(claimed.items(), results, strict=True):
            if result is None:
                continue
            if not isinstance(result, Exception):  # cancelled: not ours to keep
                raise result
            outcomes[row_id] = await self._failed(row_id, row, deliveries[row_id], result)
        return outcomes

    async def _deliver(self, work: Delivery, row: Any, deadline: float) -> None:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise PutOff("the job's time ran out before the delivery started")
        await work.deliver(OutboxEvent.from_row(row), left)

    async def _finish_delivered(self, delivered: list[int], claimed: Mapping[int, Any]) -> dict[int, Outcome]:
        """Finish the acknowledged rows whose claim is still this worker's; a row claimed by
        another worker since (this one froze past its claim) is left to it."""
        if not delivered:
            return {}
        tokens = [claimed[i]["claim_token"] for i in delivered]
        try:
            done = {r["id"]: r for r in await self.pool.fetch(self._finish, delivered, tokens)}
        except Exception as exc:  # delivered, not finished: the claim expires, the retry delivers again
            logger.warning(
                "delivered rows not finished (the database away?); they are delivered again, same id",
                extra={"rows": len(delivered), "error": describe(exc)},
            )
            return {i: Outcome.retry(HAND_BACK_DELAY, claimed[i]["kind"]) for i in delivered}
        outcomes: dict[int, Outcome] = {}
        for row_id in delivered:
            row = done.get(row_id)
            if row is None:
                logger.info(
                    "delivered, but the row's claim had passed to another worker", extra={"row_id": row_id}
                )
                outcomes[row_id] = Outcome("duplicate", kind=claimed[row_id]["kind"])
            else:
                outcomes[row_id] = Outcome(
                    "finished", kind=row["kind"], commit_to_finish=row["commit_to_finish"]
                )
        return outcomes

    async def _failed(self, row_id: int, row: Any, delivery: int, exc: Exception) -> Outcome:
        token = row["claim_token"]
        if isinstance(exc, PutOff):
            with contextlib.suppress(Exception):  # else the claim expires on its own
                await self.pool.execute(query("release_claim"), row_id, token)
            return Outcome.put_off()
        return await self.record_failure(row_id, delivery, exc, token)

    async def _unclaimed(self, ids: list[int]) -> dict[int, Outcome]:
        """Rows the claim did not take: gone (the general path says so), ended, or claimed by
        another worker (run again once that claim may have expired)."""
        if not ids:
            return {}
        outcomes: dict[int, Outcome] = {}
        for r in await self.pool.fetch(query("unclaimed_states"), ids):
            if r["status"] in ("finished", "failed"):
                outcomes[r["id"]] = Outcome("duplicate", kind=r["kind"])
            else:
                wait = max(0.1, float(r["claimed_for"] or 0.0))
                outcomes[r["id"]] = Outcome.retry(wait, r["kind"])
        return outcomes


class LiveRoutes:
    """What the live workers route and handle (outbox_relay.workers, read at most every
    ROUTES_CACHE seconds), for handing back a row of a kind this worker does not know."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._live: list[tuple[list[str], list[str]]] = []
        self._read_at = -1e9

    async def hand_back(self, row_id: int, kind: str) -> Outcome | None:
        """A retry after HAND_BACK_DELAY, uncounted, when a live worker (another one: this one has
        no handler or route for ``kind``) routes or handles ``kind``; else None."""
        if not await self._routed_elsewhere(kind):
            return None
        logger.info(
            "handing a row back: another live worker routes its kind",
            extra={"row_id": row_id, "kind": kind},
        )
        return Outcome.retry(HAND_BACK_DELAY, kind)

    async def _routed_elsewhere(self, kind: str) -> bool:
        now = time.monotonic()
        if now - self._read_at > ROUTES_CACHE:
            try:
                rows = await self.pool.fetch(query("live_worker_routes"), LIVE_WORKER_SECONDS)
            except Exception as exc:  # no table yet, or the database away: fail as before
                logger.debug("live workers' routes unreadable", extra={"error": describe(exc)})
                rows = []
            self._live = [(list(r["routes"]), list(r["kinds"])) for r in rows]
            self._read_at = now
        return any(kind in kinds or any(fnmatchcase(kind, p) for p in routes) for routes, kinds in self._live)
