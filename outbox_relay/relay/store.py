"""The relay's store: every query the relay runs, and the pending-row type.

The sweep pages through the partial indexes (``new`` rows the listener missed,
``queued`` rows the queue may have lost), so its cost follows the number of
pending rows, not the size of the table; the fast path looks notified ids up
by primary key; the hand-over moves rows to ``queued`` by compare-and-set,
fenced by the leader's epoch and never waiting on a row lock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from outbox_relay.db import Pool, Record
from outbox_relay.exceptions import LeadershipLostError
from outbox_relay.sql import query


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A row to hand (again) to the queue: its id, correlation id and requeue generation."""

    id: int
    correlation_id: str
    generation: int = 0


class RelayStore:
    """The relay's queries on the service database, as the leader of ``epoch``
    (0, no epoch any lease has: reads only, every write refused)."""

    def __init__(self, pool: Pool, *, batch_size: int, requeue_after: float, epoch: int = 0) -> None:
        self.pool = pool
        self.batch_size = batch_size
        self.requeue_after = requeue_after
        self.epoch = epoch

    async def new_rows(self) -> AsyncIterator[list[PendingRow]]:
        """Every ``new`` row, oldest id first, in pages of ``batch_size``."""
        after = 0
        while True:
            records = await self.pool.fetch(query("select_new"), after, self.batch_size)
            if not records:
                return
            yield _pending(records)
            if len(records) < self.batch_size:
                return
            after = records[-1]["id"]

    async def stale_queued_rows(self, *, everything: bool = False) -> AsyncIterator[list[PendingRow]]:
        """``queued`` rows handed over more than REQUEUE_AFTER ago (all of them if ``everything``).

        The cut-off is fixed when the sweep starts: a row enqueued again gets a
        new ``queued_at`` after it and is not seen twice; a row the hand-over
        skipped (a worker holds it) is passed by the keyset.
        """
        cutoff = await self.pool.fetchval(query("cutoff"), 0.0 if everything else self.requeue_after)
        after: tuple[datetime | None, int] = (None, 0)
        while True:
            records = await self.pool.fetch(
                query("select_stale_queued_page"), cutoff, self.batch_size, after[0], after[1]
            )
            if not records:
                return
            yield _pending(records)
            if len(records) < self.batch_size:
                return
            after = (records[-1]["queued_at"], records[-1]["id"])

    async def new_by_ids(self, ids: Sequence[int]) -> list[PendingRow]:
        """The rows among ``ids`` that are still ``new`` (the fast path's look-up by primary key)."""
        return _pending(await self.pool.fetch(query("select_new_by_ids"), list(ids)))

    async def mark_queued(self, ids: Sequence[int]) -> None:
        """Move rows to ``queued`` (compare-and-set: finished rows stay finished; rows a
        worker holds are skipped). Raises :class:`LeadershipLostError`, changing
        nothing, when this relay's lease has expired or another epoch holds it."""
        record = await self.pool.fetchrow(query("mark_queued"), list(ids), self.epoch)
        assert record is not None
        if not record["leading"]:
            raise LeadershipLostError(
                f"the lease of epoch {self.epoch} expired or was taken over by another relay"
            )

    async def check_leadership(self) -> None:
        """Raise :class:`LeadershipLostError` unless this relay's lease is valid and of its
        epoch: the fence of every write the store does not make itself (the retention loop)."""
        lease = await self.pool.fetchrow(query("lease_state"))
        if lease is None or not lease["valid"] or lease["epoch"] != self.epoch:
            raise LeadershipLostError(
                f"the lease of epoch {self.epoch} expired or was taken over by another relay"
            )


def _pending(records: list[Record]) -> list[PendingRow]:
    return [PendingRow(r["id"], r["correlation_id"], r["generation"]) for r in records]
