"""`status --watch`: the outbox's figures, refreshed in place (rich) or one plain line per refresh.

Each refresh is cheap whatever the table's size: the pending counts walk their
partial indexes, the oldest pending age is two index probes, the last failures
come from the failed rows' index, replication from the statistics views. The
finished rows are counted in full once (one scan, as plain `status` does) and
then followed: every row is finished or pending, so finished = rows at the full
count + rows that arrived since (a range of the primary key) - pending rows.
After :data:`RECOUNT_AFTER` arrivals, and after each reconnect, it counts in
full again (rows pruned while it watches show then).

Text from rows is escaped (:func:`~outbox_relay.terminal.escape_controls`) and
put in :class:`rich.text.Text`, so neither a control character nor rich markup
in a row reaches the terminal as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO

import asyncpg
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from outbox_relay.admin import STATUSES, FailedRow, failed_row, require_shape
from outbox_relay.db import DirectConnection, connect
from outbox_relay.lifecycle import cancel_and_wait, stopped_within
from outbox_relay.logs import describe
from outbox_relay.observability.sql import query as observability_query
from outbox_relay.sql import query
from outbox_relay.terminal import escape_controls

logger = logging.getLogger(__name__)

#: Bounds and default of ``--interval`` (seconds).
MIN_INTERVAL = 0.2
MAX_INTERVAL = 60.0
DEFAULT_INTERVAL = 1.0
#: Failed rows shown, newest first.
FAILURES_SHOWN = 5
#: Rows arrived since the last full count after which the next refresh counts in full again.
RECOUNT_AFTER = 100_000
#: Seconds one refresh may take before the connection counts as lost.
QUERY_TIMEOUT = 10.0
#: Errors that mean the connection (or the server) is gone: shown, then reconnected.
LOST = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


@dataclass(frozen=True)
class Replication:
    """The subscription's figures (``subscription_health``)."""

    enabled: bool
    lag_seconds: float | None
    apply_errors: int
    sync_errors: int


@dataclass(frozen=True)
class Sample:
    """One refresh's figures."""

    at: float  #: time.monotonic() when taken
    counts: dict[str, int]
    rows: int  #: every row of the outbox (finished + pending)
    oldest_pending_age_seconds: float | None
    replication: Replication | None
    failures: list[FailedRow] = field(default_factory=list)


@dataclass(frozen=True)
class Rates:
    """Rows per second between two samples."""

    arrived: float
    finished: float
    failed: float


@dataclass(frozen=True)
class Frame:
    """What one refresh shows: the latest figures, their rates, and a connection problem if any."""

    interval: float
    sample: Sample | None = None
    rates: Rates | None = None
    problem: str | None = None
    wall_clock: datetime = field(default_factory=lambda: datetime.now(UTC))


def rates_between(before: Sample, after: Sample) -> Rates | None:
    """Rows per second from ``before`` to ``after`` (never negative: a prune is not a rate)."""
    elapsed = after.at - before.at
    if elapsed <= 0:
        return None

    def per_second(now: int, then: int) -> float:
        return max(0, now - then) / elapsed

    return Rates(
        arrived=per_second(after.rows, before.rows),
        finished=per_second(after.counts["finished"], before.counts["finished"]),
        failed=per_second(after.counts["failed"], before.counts["failed"]),
    )


class Sampler:
    """Takes samples on one connection; :meth:`recount` makes the next one count in full."""

    def __init__(self) -> None:
        self._base_rows = 0
        self._base_max_id: int | None = None

    def recount(self) -> None:
        """Count every row again on the next sample (after a reconnect)."""
        self._base_max_id = None

    async def sample(self, conn: DirectConnection) -> Sample:
        """The figures, read in one snapshot."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if self._base_max_id is None:
                self._base_rows = sum(int(r["n"]) for r in await conn.fetch(query("status_counts")))
                self._base_max_id = int(await conn.fetchval(query("max_id")))
                arrived = 0
            else:
                arrived = int(await conn.fetchval(query("rows_after"), self._base_max_id))
            pending = await conn.fetchrow(observability_query("pending_counts"))
            assert pending is not None
            age = await conn.fetchval(query("oldest_pending_age"))
            failures = [failed_row(r) for r in await conn.fetch(query("recent_failed_rows"), FAILURES_SHOWN)]
            sub = await conn.fetchrow(observability_query("subscription_health"))
        rows = self._base_rows + arrived
        counts = {name: int(pending[name]) for name in ("new", "queued", "failed")}
        counts["finished"] = max(0, rows - sum(counts.values()))
        if arrived > RECOUNT_AFTER:
            self.recount()
        replication = None
        if sub is not None:
            lag = sub["lag_seconds"]
            replication = Replication(
                bool(sub["enabled"]),
                None if lag is None else max(0.0, float(lag)),
                int(sub["apply_errors"]),
                int(sub["sync_errors"]),
            )
        return Sample(
            time.monotonic(),
            {name: counts[name] for name in STATUSES},
            rows,
            None if age is None else max(0.0, float(age)),
            replication,
            failures,
        )


# -- rendering ---------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.1f} s"


def _replication_text(replication: Replication | None) -> str:
    if replication is None:
        return "no subscription (direct shape)"
    state = "enabled" if replication.enabled else "DISABLED"
    lag = "no apply worker" if replication.lag_seconds is None else f"lag {replication.lag_seconds:.1f} s"
    return f"{state}, {lag}, apply errors {replication.apply_errors}, sync errors {replication.sync_errors}"


def _last_error(row: FailedRow) -> str:
    if row.errors:
        return str(row.errors[-1].get("error"))
    return str(row.last_error)


def render(frame: Frame) -> RenderableType:
    """The view of one frame (every value from a row escaped and shown literally)."""
    stamp = frame.wall_clock.strftime("%Y-%m-%d %H:%M:%S UTC")
    header = Text(f"outbox-relay status, every {frame.interval:g} s, {stamp}  (Ctrl-C ends)", style="bold")
    parts: list[RenderableType] = [header]
    if frame.problem is not None:
        parts.append(Text(f"database: {frame.problem}; reconnecting", style="bold red"))
    sample = frame.sample
    if sample is None:
        parts.append(Text("waiting for the first figures"))
        return Group(*parts)
    rates = frame.rates
    table = Table(box=None, show_header=True, pad_edge=False)
    table.add_column(Text("status"))
    table.add_column(Text("rows"), justify="right")
    table.add_column(Text("rows/s"), justify="right")
    per_status = {
        "finished": None if rates is None else rates.finished,
        "failed": None if rates is None else rates.failed,
    }
    for name in STATUSES:
        rate = per_status.get(name)
        table.add_row(Text(name), Text(str(sample.counts[name])), Text("" if rate is None else f"{rate:.1f}"))
    table.add_row(
        Text("all (arrived)"), Text(str(sample.rows)), Text("" if rates is None else f"{rates.arrived:.1f}")
    )
    parts.append(table)
    parts.append(Text(f"oldest pending: {_seconds(sample.oldest_pending_age_seconds)}"))
    parts.append(Text(f"replication: {_replication_text(sample.replication)}"))
    if sample.failures:
        parts.append(Text(f"last failures (newest first, {sample.counts['failed']} failed):"))
        failures = Table(box=None, show_header=True, pad_edge=False)
        for column in ("correlation id", "kind", "attempts", "error"):
            failures.add_column(Text(column), overflow="fold")
        for row in sample.failures:
            failures.add_row(
                Text(escape_controls(row.correlation_id)),
                Text(escape_controls(row.kind)),
                Text(str(row.attempts)),
                Text(escape_controls(_last_error(row))),
            )
        parts.append(failures)
    return Group(*parts)


def plain_line(frame: Frame) -> str:
    """One line for a frame, for output that is not a terminal."""
    stamp = frame.wall_clock.strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = [stamp]
    sample = frame.sample
    if sample is not None:
        fields += [f"{name}={sample.counts[name]}" for name in STATUSES]
        fields.append(f"rows={sample.rows}")
        if frame.rates is not None:
            fields += [
                f"arrived/s={frame.rates.arrived:.1f}",
                f"finished/s={frame.rates.finished:.1f}",
                f"failed/s={frame.rates.failed:.1f}",
            ]
        age = sample.oldest_pending_age_seconds
        fields.append("oldest_pending=" + ("none" if age is None else f"{age:.1f}s"))
        replication = sample.replication
        if replication is not None:
            lag = replication.lag_seconds
            fields.append("lag=" + ("none" if lag is None else f"{lag:.1f}s"))
            if not replication.enabled:
                fields.append("subscription=disabled")
    if frame.problem is not None:
        fields.append(f'database="{escape_controls(frame.problem)}"')
    return " ".join(fields)


# -- the loop ------------------------------------------------------------------------------------


async def watch(
    conn: DirectConnection,
    url: str,
    *,
    interval: float,
    stop: asyncio.Event,
    show: Callable[[Frame], None],
) -> None:
    """Refresh every ``interval`` seconds until ``stop``, showing each :class:`Frame`.

    ``conn`` is the first connection (checked and owned from here on); a lost
    connection is shown and replaced, whatever the outage's length.
    """
    sampler = Sampler()
    current: DirectConnection | None = conn
    last: Sample | None = None
    rates: Rates | None = None

    async def refresh() -> str | None:
        """One sample (reconnecting first when needed); the problem to show, if any."""
        nonlocal current, last, rates
        try:
            if current is None:
                current = await connect(url, application_name="outbox_relay.status")
                await require_shape(current, "service", "status --watch")
                sampler.recount()
            sample = await asyncio.wait_for(sampler.sample(current), QUERY_TIMEOUT)
        except LOST as exc:
            logger.debug("status --watch: refresh failed", exc_info=True)
            if current is not None:
                await _close(current)
            current, rates = None, None
            return f"connection lost ({describe(exc)})"
        if last is not None:
            rates = rates_between(last, sample)
        last = sample
        return None

    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            # Ctrl-C ends the view at once, even in a connect or a query that waits on a dead server.
            step = asyncio.ensure_future(refresh())
            await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                await cancel_and_wait(step)
                return
            show(Frame(interval, last, rates, step.result()))
            if await stopped_within(stop, interval):
                return
    finally:
        if not stopped.done():
            await cancel_and_wait(stopped)
        if current is not None:
            await _close(current)


async def _close(conn: DirectConnection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 2.0)
    if not conn.is_closed():
        conn.terminate()


@contextlib.contextmanager
def live_view(stream: IO[str]) -> Iterator[Callable[[Frame], None]]:
    """A ``show`` function: a rich view refreshed in place on a terminal, else a line per frame."""
    console = Console(file=stream)
    if not console.is_terminal:

        def line(frame: Frame) -> None:
            print(plain_line(frame), file=stream, flush=True)

        yield line
        return
    with Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:

        def refresh(frame: Frame) -> None:
            live.update(render(frame), refresh=True)

        yield refresh
