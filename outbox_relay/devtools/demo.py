"""`demo`: the whole service on embedded PostgreSQL and Redis, under a load, with a report.

It needs no settings. One embedded PostgreSQL cluster (``wal_level =
logical``) holds both the primary and the service database, replicated by a
real subscription; an embedded Redis holds the queue. The relay and the
workers run as separate processes, exactly as they would in production.
Producers commit reservations' outcomes on the primary; the demo shows
progress and ends with throughput, commit→finished latency percentiles, and
the checks that matter: nothing lost, every effect applied once, money
conserved. Everything it started is stopped and removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from outbox_relay.composition import replication_config
from outbox_relay.db import Connection, connect
from outbox_relay.devtools.embedded import EmbeddedPostgres, EmbeddedRedis
from outbox_relay.devtools.processes import log_tails, service_env, spawn
from outbox_relay.devtools.processes import stop as stop_processes
from outbox_relay.devtools.setup import prepare
from outbox_relay.exceptions import DemoError
from outbox_relay.replication import unsubscribe
from outbox_relay.settings import Settings
from outbox_relay.terminal import escape_controls

ACCOUNTS = 20
ACCOUNT_BALANCE = 10_000_000
#: Rows that can never succeed, to show quarantine: (correlation id, kind, outcome, payload, why).
POISON: list[tuple[str, str, str | None, str]] = [
    ("demo-poison-unknown-kind", "email", "success", "{}"),
    ("demo-poison-no-reservation", "reservation", "success", "{}"),
    ("demo-poison-bad-outcome", "reservation", "maybe", "{}"),
    ("demo-poison-bad-payload", "reservation", "success", "[1, 2, 3]"),
]


@dataclass(frozen=True)
class DemoOptions:
    """What the demo drives."""

    events: int = 3000
    workers: int = 2
    producers: int = 4
    #: events/s offered in the steady phase (half the events); the other half is a burst
    rate: float = 200.0
    #: None: the reservation flow; "nats": events routed to JetStream (devtools/demo_nats.py)
    sink: str | None = None


@dataclass
class DemoReport:
    """The demo's findings; ``ok`` is False when any check failed."""

    lines: list[str] = field(default_factory=list)
    ok: bool = True

    def check(self, condition: bool, text: str) -> None:
        self.ok = self.ok and condition
        self.lines.append(f"  [{'ok' if condition else 'FAILED'}] {text}")


def say(text: str = "") -> None:
    """Print a line of the demo's narrative at once."""
    print(text, flush=True)


async def run_demo(options: DemoOptions) -> int:
    """Run the demo; 0 when every check passed."""
    if options.sink == "nats":
        from outbox_relay.devtools.demo_nats import run_nats_demo

        return await run_nats_demo(options.events, options.workers)
    workdir = Path(tempfile.mkdtemp(prefix="outbox-relay-demo-"))
    say("outbox_relay demo: embedded PostgreSQL (logical replication) + Redis, relay and workers")
    started = time.monotonic()
    pg = EmbeddedPostgres(workdir / "postgres")
    redis = EmbeddedRedis(workdir / "redis")
    (workdir / "postgres").mkdir()
    (workdir / "redis").mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        pg.start()
        redis.start()
        say(
            f"  servers up in {time.monotonic() - started:.1f} s "
            f"(PostgreSQL on 127.0.0.1:{pg.port}, Redis on 127.0.0.1:{redis.port})"
        )
        settings = Settings(
            database_url=SecretStr(pg.create_database("service")),
            primary_url=SecretStr(pg.create_database("primary")),
            redis_url=SecretStr(redis.url()),
        )
        report = await _demo(options, settings, workdir, processes)
    finally:
        stop_processes(processes, timeout=15)
        redis.cleanup()
        pg.cleanup()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    say()
    say("\n".join(report.lines))
    say()
    say(
        "demo passed: nothing lost, every effect applied once, money conserved"
        if report.ok
        else "demo FAILED: see the checks above"
    )
    say("cleaned up: servers stopped, files removed")
    return 0 if report.ok else 1


async def _demo(
    options: DemoOptions, settings: Settings, workdir: Path, processes: list[subprocess.Popen[bytes]]
) -> DemoReport:
    service_url = settings.require_database_url()
    primary_url = settings.require_primary_url()
    subscribed = await prepare(settings)
    assert subscribed is not None, "the demo's settings name a primary"
    say("  schemas migrated (service database and primary)")
    say(f"  subscription {subscribed.name} created; replication running")

    service = await connect(service_url)
    try:
        amounts = await _prepare_ledger(service, options.events)
        initial_total = await _money_total(service)
        say(
            f"  ledger: {ACCOUNTS} accounts, {options.events} reservations made "
            f"(total money {initial_total:,})"
        )

        env = service_env(settings)
        processes.append(spawn(["-m", "outbox_relay", "run"], env, workdir / "relay.log"))
        for index in range(options.workers):
            log = workdir / f"worker-{index}.log"
            processes.append(spawn(["-m", "outbox_relay", "worker"], env, log))
        await _warm_up(service, primary_url, processes, workdir)
        say(f"  relay and {options.workers} worker processes started and warmed up")

        outcomes = {
            cid: ("success" if random.random() < 0.8 else "failure")  # noqa: S311
            for cid in amounts
        }
        steady = dict(list(outcomes.items())[: options.events // 2])
        burst = dict(list(outcomes.items())[options.events // 2 :])
        say(
            f"  phase 1, steady: {len(steady)} events (+{len(POISON)} poison rows) offered at "
            f"{options.rate:.0f}/s by {options.producers} producers (latency)"
        )
        offered = Offered(1)  # the warm-up event
        producing = asyncio.create_task(
            _produce(primary_url, steady, options.producers, options.rate, POISON, offered)
        )
        await _show_progress(
            service,
            1 + len(steady) + len(POISON),
            producing,
            processes,
            workdir,
            phase="phase 1, steady (latency)",
            offered=offered,
        )
        await producing
        say(f"  phase 2, burst: {len(burst)} events as fast as {options.producers} producers go (throughput)")
        producing = asyncio.create_task(_produce(primary_url, burst, options.producers, 0.0, [], offered))
        await _show_progress(
            service,
            1 + options.events + len(POISON),
            producing,
            processes,
            workdir,
            phase="phase 2, burst (throughput)",
            offered=offered,
        )
        await producing
        return await _report(service, steady, burst, amounts, initial_total, options)
    finally:
        await service.close()
        await unsubscribe(replication_config(settings))


async def _warm_up(
    service: Connection, primary_url: str, processes: list[subprocess.Popen[bytes]], workdir: Path
) -> None:
    """One event through the whole path, so that start-up time is not counted as latency."""
    await service.execute("SELECT ledger.reserve('account-00', 1, 'demo-warm-up')")
    primary = await connect(primary_url)
    try:
        await primary.execute(
            "INSERT INTO outbox_relay.outbox (correlation_id, outcome) VALUES ('demo-warm-up', 'success')"
        )
    finally:
        await primary.close()
    deadline = time.monotonic() + 60
    while (
        await service.fetchval(
            "SELECT count(*) FROM outbox_relay.outbox"
            " WHERE correlation_id = 'demo-warm-up' AND status = 'finished'"
        )
        == 0
    ):
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            logs = await asyncio.to_thread(log_tails, workdir)
            raise DemoError(f"the relay and workers did not come up\n{logs}")
        await asyncio.sleep(0.05)


async def _prepare_ledger(service: Connection, events: int) -> dict[str, int]:
    await service.executemany(
        "INSERT INTO ledger.accounts (id, balance) VALUES ($1, $2)",
        [(f"account-{a:02d}", ACCOUNT_BALANCE) for a in range(ACCOUNTS)],
    )
    amounts = {f"demo-{i:06d}": random.randint(1, 1_000) for i in range(events)}  # noqa: S311
    await service.executemany(
        "SELECT ledger.reserve($1, $2, $3)",
        [(f"account-{i % ACCOUNTS:02d}", amount, cid) for i, (cid, amount) in enumerate(amounts.items())],
    )
    return amounts


async def _produce(
    primary_url: str,
    outcomes: dict[str, str],
    producers: int,
    rate: float,
    poison: list[tuple[str, str, str | None, str]],
    offered: Offered,
) -> None:
    """Commit every outcome on the primary, one transaction per event, as a backend would."""
    rows: list[tuple[str, str, str | None, str]] = [
        (cid, "reservation", outcome, "{}") for cid, outcome in outcomes.items()
    ]
    # Poison rows spread through the load: they must not hold anything up.
    for index, row in enumerate(poison):
        rows.insert((index + 1) * len(rows) // (len(poison) + 1), row)
    queue: asyncio.Queue[tuple[str, str, str | None, str]] = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)
    start = time.monotonic()
    interval = 1.0 / rate if rate else 0.0
    sent = 0

    async def producer() -> None:
        nonlocal sent
        conn = await connect(primary_url)
        try:
            statement = await conn.prepare(
                "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload)"
                " VALUES ($1, $2, $3, $4::jsonb)"
            )
            while not queue.empty():
                row = queue.get_nowait()
                if interval:  # open loop: the schedule, not the replies, sets the pace
                    due = start + sent * interval
                    sent += 1
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await statement.fetch(*row)
                offered.count += 1
        finally:
            await conn.close()

    await asyncio.gather(*(producer() for _ in range(producers)))


@dataclass
class Offered:
    """Events the producers have committed on the primary so far."""

    count: int = 0


def progress_view(
    phase: str, offered: int, total: int, counts: dict[str, int], rate: float | None
) -> RenderableType:
    """The live progress view on a terminal: the phase, events offered, replicated, handed over, done."""
    done = counts.get("finished", 0) + counts.get("failed", 0)
    table = Table.grid(padding=(0, 2))
    table.add_column(justify="left")
    table.add_column(justify="right")
    rows = [
        ("offered on the primary", f"{offered}/{total}"),
        ("replicated", str(sum(counts.values()))),
        ("queued", str(counts.get("queued", 0))),
        ("finished", str(counts.get("finished", 0))),
        ("failed", str(counts.get("failed", 0))),
        ("rate", "" if rate is None else f"{rate:.0f} events/s"),
    ]
    for label, value in rows:
        table.add_row(Text(label), Text(value))
    return Group(
        Text(f"  {phase}", style="bold"),
        ProgressBar(total=max(total, 1), completed=min(done, total), width=60),
        table,
    )


async def _show_progress(
    service: Connection,
    total: int,
    producing: asyncio.Task[None],
    processes: list[subprocess.Popen[bytes]],
    workdir: Path,
    *,
    phase: str,
    offered: Offered,
) -> None:
    """Poll the counts until the phase's rows are done: a live view on a terminal, else a line a second."""
    console = Console()
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(Live(console=console, auto_refresh=False)) if console.is_terminal else None
        last_print = 0.0
        started = time.monotonic()
        done_at_start: int | None = None
        deadline = started + max(120.0, total / 50)
        while True:
            counts: dict[str, int] = {
                r["status"]: r["n"]
                for r in await service.fetch(
                    "SELECT status, count(*) AS n FROM outbox_relay.outbox GROUP BY status"
                )
            }
            done = counts.get("finished", 0) + counts.get("failed", 0)
            now = time.monotonic()
            if live is not None:
                done_at_start = done if done_at_start is None else done_at_start
                elapsed = now - started
                rate = (done - done_at_start) / elapsed if elapsed > 0.5 else None
                live.update(progress_view(phase, offered.count, total, counts, rate), refresh=True)
            elif now - last_print >= 1.0 or done >= total:
                say(
                    f"  replicated {sum(counts.values()):>6}/{total}  queued {counts.get('queued', 0):>5}  "
                    f"finished {counts.get('finished', 0):>6}  failed {counts.get('failed', 0):>3}"
                )
                last_print = now
            if done >= total and producing.done():
                return
            if producing.done() and producing.exception() is not None:
                raise producing.exception()  # type: ignore[misc]
            dead = [p for p in processes if p.poll() is not None]
            if dead or now > deadline:
                logs = await asyncio.to_thread(log_tails, workdir)
                raise DemoError(f"the demo stalled (a process exited or time ran out)\n{logs}")
            await asyncio.sleep(0.25)


async def _phase_stats(service: Connection, ids: list[str]) -> Any:
    return await service.fetchrow(
        """
        SELECT count(*) AS n,
               extract(epoch FROM max(finished_at) - min(created_at))::float8 AS span,
               percentile_cont(0.50) WITHIN GROUP (ORDER BY finished_at - created_at) AS p50,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY finished_at - created_at) AS p95,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY finished_at - created_at) AS p99,
               max(finished_at - created_at) AS worst
          FROM outbox_relay.outbox
         WHERE correlation_id = ANY($1::text[]) AND status = 'finished'
        """,
        ids,
    )


async def _report(
    service: Connection,
    steady: dict[str, str],
    burst: dict[str, str],
    amounts: dict[str, int],
    initial_total: int,
    options: DemoOptions,
) -> DemoReport:
    report = DemoReport()
    outcomes = {**steady, **burst}
    latency = await _phase_stats(service, list(steady))
    throughput = await _phase_stats(service, list(burst))

    def ms(value: Any) -> str:
        return f"{value.total_seconds() * 1000:.1f} ms" if value is not None else "n/a"

    report.lines.append("summary")
    report.lines.append(
        f"  events       {options.events} (+{len(POISON)} poison rows), {options.workers} worker processes"
    )
    report.lines.append(
        f"  latency      commit -> finished at {options.rate:.0f} events/s offered: "
        f"p50 {ms(latency['p50'])}  p95 {ms(latency['p95'])}  "
        f"p99 {ms(latency['p99'])}  max {ms(latency['worst'])}"
    )
    span = float(throughput["span"] or 0.0)
    if span > 0:
        report.lines.append(
            f"  throughput   {throughput['n'] / span:,.0f} events/s end to end in the burst "
            f"({throughput['n']} events, first commit to last finish {span:.2f} s)"
        )
    report.lines.append("checks")

    rows = {
        r["correlation_id"]: r
        for r in await service.fetch("SELECT correlation_id, status, last_error FROM outbox_relay.outbox")
    }
    missing = [cid for cid in outcomes if cid not in rows]
    unfinished = [cid for cid in outcomes if cid in rows and rows[cid]["status"] != "finished"]
    report.check(
        not missing and not unfinished,
        f"nothing lost: all {len(outcomes)} events replicated and finished"
        + (f" (missing {len(missing)}, unfinished {len(unfinished)})" if missing or unfinished else ""),
    )
    poison_ok = all(rows.get(cid) is not None and rows[cid]["status"] == "failed" for cid, *_ in POISON)
    report.check(poison_ok, f"{len(POISON)} poison rows quarantined as failed, the rest kept flowing:")
    for cid, *_ in POISON:
        error = rows[cid]["last_error"] if cid in rows else "missing"
        report.lines.append(f"         {escape_controls(cid)}: {escape_controls(str(error))}")

    states: dict[str, str] = {
        r["correlation_id"]: r["state"]
        for r in await service.fetch("SELECT correlation_id, state FROM ledger.reservations")
    }
    expected = {cid: ("burned" if outcome == "success" else "reclaimed") for cid, outcome in outcomes.items()}
    wrong = [cid for cid, state in expected.items() if states.get(cid) != state]
    burned = sum(1 for s in expected.values() if s == "burned")
    report.check(
        not wrong,
        f"every effect applied once: {burned} burned, {len(expected) - burned} reclaimed"
        + (f" ({len(wrong)} wrong)" if wrong else ""),
    )
    final_total = await _money_total(service)
    reclaimed = sum(amounts[cid] for cid, s in expected.items() if s == "reclaimed")
    balances = int(await service.fetchval("SELECT sum(balance) FROM ledger.accounts"))
    report.check(
        final_total == initial_total,
        f"money conserved: {initial_total:,} before = {final_total:,} after "
        f"(balances {balances:,}, of which {reclaimed:,} reclaimed)",
    )
    return report


async def _money_total(conn: Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT (SELECT coalesce(sum(balance), 0) FROM ledger.accounts)"
            " + (SELECT coalesce(sum(amount), 0) FROM ledger.reservations"
            "    WHERE state IN ('reserved', 'burned'))"
        )
    )
