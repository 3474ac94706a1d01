"""Retention: `prune` removes old rows in small batches, without long locks.

**Service database** (:func:`prune_service`): ``finished`` rows whose
``finished_at`` is older than the cut-off (``failed`` rows too, only when asked).
No index is added for it: the hot path keeps its partial indexes only. Instead
the prune walks the primary key in ranges of ``batch_size`` ids, each range one
short DELETE (its own transaction). An empty stretch of ids is crossed with one
index probe, so ids pruned before cost nothing.

Where the walk stops: ids are handed out in insert order and ``created_at`` is
the producer transaction's start, so once a row X was created after the
cut-off, every row with a higher id committed after X's insert and so finished
after the cut-off too (finished_at >= commit > X.created_at > cut-off): nothing
deletable follows X. The walk stops at the first range whose rows were *all*
created after the cut-off (min(created_at) > cut-off), or at the largest id.
It only ever shortens the walk: the DELETE itself checks ``finished_at``, so a
wrong stop (clocks of two servers apart, hand-written timestamps) at worst
leaves rows for a later run. With regular runs the walk covers the rows pruned
now plus one range, whatever the size of the table.

**Primary** (:func:`prune_primary`): the producer table has no status; a row
may go once it is older than the cut-off *and* every logical replication slot
of the database has confirmed receiving it. The candidates are read in one
REPEATABLE READ snapshot, then ``pg_current_wal_insert_lsn()``: every row that
snapshot sees committed before that LSN. Once each slot's
``confirmed_flush_lsn`` has reached it, the subscriber has applied and flushed
those rows, and they are deleted by id. With no logical slot at all the prune
refuses (a future subscription would copy rows that are gone); a slot that
does not catch up in time fails it before anything of that round is deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

from outbox_relay.db import Connection, Pool
from outbox_relay.exceptions import NoSubscriberError, SubscriberLagError
from outbox_relay.lifecycle import stopped_within
from outbox_relay.sql import query


@dataclass(frozen=True)
class RetentionConfig:
    """How long finished rows stay, how often the relay prunes, rows per step."""

    retention: float
    interval: float
    batch_size: int


if TYPE_CHECKING:
    Executor: TypeAlias = Connection | Pool
else:
    Executor = Any

logger = logging.getLogger(__name__)

MIN_ID = -(2**63)
MAX_ID = 2**63 - 1

#: Seconds `prune --primary` waits, by default, for the slots to confirm the candidates.
DEFAULT_WAIT_TIMEOUT = 30.0
#: Candidates the primary prune reads per snapshot (one wait for the slots each).
PRIMARY_ROUND_ROWS = 100_000


@dataclass
class PruneStats:
    """What one prune run did: rows deleted, id ranges visited (its cost), slot waits."""

    deleted: int = 0
    ranges: int = 0
    rounds: int = 0


def _range_end(lo: int, batch_size: int) -> int:
    return min(lo + batch_size - 1, MAX_ID)


# -- service database ----------------------------------------------------------------


#: Called before each DELETE of a prune: raises to stop it (the relay's leadership check).
Fence = Callable[[], Awaitable[None]]


async def prune_service(
    conn_or_pool: Executor,
    *,
    older_than: float,
    batch_size: int,
    include_failed: bool = False,
    fence: Fence | None = None,
) -> PruneStats:
    """Delete ``finished`` rows (and ``failed`` ones if ``include_failed``) finished more
    than ``older_than`` seconds ago. Each batch is its own transaction, and ``fence``
    (when given) runs before each one."""
    statuses = ["finished", "failed"] if include_failed else ["finished"]
    stats = PruneStats()
    started = time.monotonic()
    cutoff: datetime = await conn_or_pool.fetchval(query("cutoff"), older_than)

    async def delete(lo: int, hi: int) -> datetime | None:
        if fence is not None:
            await fence()
        step = await conn_or_pool.fetchrow(query("prune_service_range"), lo, hi, cutoff, statuses)
        assert step is not None
        stats.deleted += int(step["pruned"])
        oldest: datetime | None = step["oldest"]
        return oldest

    await _walk(conn_or_pool, MIN_ID, cutoff, batch_size, stats, delete)
    _log("service database", stats, started)
    return stats


#: One range of a walk: does its work on ids ``lo``..``hi``, returns the range's oldest ``created_at``.
Visit = Callable[[int, int], Awaitable[datetime | None]]


async def _walk(
    executor: Executor,
    first: int,
    cutoff: datetime,
    batch_size: int,
    stats: PruneStats,
    visit: Visit,
    enough: Callable[[], bool] = lambda: False,
) -> int | None:
    """The one pruning loop: walk the primary key from ``first`` in ranges of ``batch_size``
    ids (an empty stretch crossed with one probe), ``visit`` each, until a range created
    wholly after ``cutoff`` or the largest id; return None then, or where to go on once
    ``enough`` says so after a range."""
    last_id: int | None = await executor.fetchval(query("prune_last_id"))
    lo: int | None = await executor.fetchval(query("prune_first_id"), first)
    while last_id is not None and lo is not None and lo <= last_id:
        hi = _range_end(lo, batch_size)
        oldest = await visit(lo, hi)
        stats.ranges += 1
        if (oldest is not None and oldest > cutoff) or hi >= last_id:
            return None
        if enough():
            return hi + 1
        lo = await executor.fetchval(query("prune_first_id"), hi + 1)
    return None


async def prune_periodically(
    pool: Pool,
    config: RetentionConfig,
    stop: asyncio.Event,
    *,
    on_pruned: Callable[[int], None],
    fence: Fence | None = None,
) -> None:
    """With RETENTION set, the active relay prunes finished rows every PRUNE_INTERVAL, until
    ``stop``; ``fence`` (its leadership check) runs before every DELETE."""
    while not await stopped_within(stop, config.interval):
        stats = await prune_service(
            pool, older_than=config.retention, batch_size=config.batch_size, fence=fence
        )
        deleted = stats.deleted
        on_pruned(deleted)
        if deleted:
            logger.info("pruned finished rows", extra={"rows": deleted})


# -- primary ---------------------------------------------------------------------------


async def prune_primary(
    conn: Connection,
    *,
    older_than: float,
    batch_size: int,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    poll_interval: float = 0.1,
    round_rows: int = PRIMARY_ROUND_ROWS,
) -> PruneStats:
    """Delete primary outbox rows created more than ``older_than`` seconds ago that every
    logical slot of the database has confirmed; the stats tell the rounds (slot waits) too.

    Raises :class:`NoSubscriberError` when the database has no logical slot, and
    :class:`SubscriberLagError` when a slot does not confirm the candidates within
    ``wait_timeout`` seconds (rows of earlier rounds stay deleted; the error says how many).
    """
    stats = PruneStats()
    started = time.monotonic()
    _no_subscriber_unless(await conn.fetch(query("prune_logical_slots"), "0/0"))
    cutoff: datetime = await conn.fetchval(query("cutoff"), older_than)
    lo: int | None = MIN_ID
    while lo is not None:
        ids, lsn, lo = await _candidates(conn, lo, cutoff, batch_size, round_rows, stats)
        if not ids:
            continue
        stats.rounds += 1
        await _wait_for_slots(conn, lsn, wait_timeout, poll_interval, stats.deleted)
        for start in range(0, len(ids), batch_size):
            status = await conn.execute(query("prune_primary_ids"), ids[start : start + batch_size])
            stats.deleted += int(status.split()[-1])
    _log("primary", stats, started)
    return stats


async def _candidates(
    conn: Connection, lo: int, cutoff: datetime, batch_size: int, round_rows: int, stats: PruneStats
) -> tuple[list[int], str, int | None]:
    """One snapshot: up to about ``round_rows`` candidate ids from ``lo`` on, the WAL
    insert LSN read after that snapshot exists, and where the next round starts (None: done)."""
    ids: list[int] = []

    async def collect(first: int, hi: int) -> datetime | None:
        step = await conn.fetchrow(query("prune_primary_range"), first, hi, cutoff)
        assert step is not None
        ids.extend(step["ids"])
        oldest: datetime | None = step["oldest"]
        return oldest

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        following = await _walk(conn, lo, cutoff, batch_size, stats, collect, lambda: len(ids) >= round_rows)
        lsn: str = await conn.fetchval(query("prune_wal_insert_lsn"))
    return ids, lsn, following


async def _wait_for_slots(
    conn: Connection, lsn: str, timeout: float, poll_interval: float, pruned: int
) -> None:
    """Return once every logical slot of the database has confirmed ``lsn``."""
    deadline = time.monotonic() + timeout
    nudged = False
    while True:
        slots = await conn.fetch(query("prune_logical_slots"), lsn)
        _no_subscriber_unless(slots)
        lagging = [s for s in slots if not s["caught_up"]]
        if not lagging:
            return
        if not nudged:
            await conn.fetchval(query("prune_wal_nudge"))
            nudged = True
        if time.monotonic() >= deadline:
            described = ", ".join(
                f"{s['slot_name']} ({'active' if s['active'] else 'inactive'}, "
                f"confirmed {s['confirmed_flush_lsn'] or 'nothing'})"
                for s in lagging
            )
            earlier = f"; {pruned} rows of earlier rounds were pruned" if pruned else ""
            raise SubscriberLagError(
                f"not pruning the primary: replication slot {described} has not confirmed WAL "
                f"position {lsn} after {timeout:g} s, so its subscriber may not have received "
                f"every row due for pruning; those rows were kept{earlier}",
                lagging=[str(s["slot_name"]) for s in lagging],
                pruned=pruned,
            )
        await asyncio.sleep(poll_interval)


def _no_subscriber_unless(slots: list[Any]) -> None:
    if not slots:
        raise NoSubscriberError(
            "not pruning the primary: this database has no logical replication slot, so no "
            "subscriber is attached and a later `subscribe` would copy rows that pruning "
            "removed; subscribe first"
        )


def _log(where: str, stats: PruneStats, started: float) -> None:
    logger.log(
        logging.INFO if stats.deleted else logging.DEBUG,
        "pruned",
        extra={
            "database": where,
            "rows": stats.deleted,
            "ranges": stats.ranges,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
