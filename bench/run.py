"""The whole bench: servers, then each scenario in order, then the table (and JSON)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bench.fleet import Fleet
from bench.ledger import Ledger
from bench.options import BenchOptions
from bench.report import render, say
from bench.results import Results
from bench.scenarios import (
    backlog,
    commit_rate,
    latency,
    noop_ceiling,
    scaling,
    sink_routes,
    table_scale,
    throughput,
)
from bench.servers import Servers, machine
from bench.sinks import measured
from bench.sinks import webhook as webhook_route
from bench.sql import scratch_databases
from outbox_relay.composition import replication_config
from outbox_relay.devtools import processes
from outbox_relay.devtools.setup import prepare
from outbox_relay.replication import unsubscribe
from outbox_relay.settings import Settings


async def run_bench(options: BenchOptions, settings: Settings | None) -> int:
    """Run every measurement, print the table, write JSON if asked; 0 on success."""
    workdir = Path(tempfile.mkdtemp(prefix="outbox-relay-bench-"))
    say("starting servers" + (" (embedded)" if not options.use_settings else " (from settings)"))
    servers = Servers(settings if options.use_settings else None, workdir, fsync_off=options.fsync_off)
    try:
        results = await _bench(options, servers, workdir)
    finally:
        servers.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(results.as_json(), indent=2) + "\n")
        say(f"results written to {options.json_path}")
    return 0


async def _bench(options: BenchOptions, servers: Servers, workdir: Path) -> Results:
    """Two scratch databases (service, primary) subscribed, every scenario on them; then the table scale."""
    results = Results(workers=options.workers, machine=machine(), durable=not options.fsync_off)
    tag = uuid.uuid4().hex[:8]
    service_db, primary_db = f"bench_service_{tag}", f"bench_primary_{tag}"
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
        results.machine["postgresql"] = servers.durability()
    async with scratch_databases(servers.admin_url, service_db, primary_db):
        try:
            await prepare(settings)
            say(
                "[0] commit rate of single-row outbox inserts with the notify trigger, "
                f"{options.anchor_seconds:g} s each"
            )
            results.commit_rate = await commit_rate.measure(servers, tag, options.anchor_seconds)
            say("    " + ", ".join(f"{n} producer(s) {r:,.0f}/s" for n, r in results.commit_rate.items()))
            fleet = Fleet(processes.service_env(settings), workdir)
            ledger = Ledger(settings, options.accounts)
            await ledger.open()
            try:
                await Run(options, settings, servers, fleet, ledger, workdir, results, tag).scenarios()
            finally:
                fleet.stop()
                await ledger.close()
            say(f"[5] table scale: sweep cost with 0 and {options.table_rows:,} finished rows")
            results.table = await table_scale.measure(servers, options.table_rows, tag)
        finally:
            await unsubscribe(replication_config(settings))
    return results


def _add(runs: dict[int, list[float]], medians: dict[int, float], count: int, value: float) -> None:
    """One round's figure, and the median of the rounds so far."""
    runs.setdefault(count, []).append(value)
    medians[count] = statistics.median(runs[count])


@dataclass
class Run:
    """The scenarios that need the relay and worker processes, on one pair of databases."""

    options: BenchOptions
    settings: Settings
    servers: Servers
    fleet: Fleet
    ledger: Ledger
    workdir: Path
    results: Results
    tag: str

    async def scenarios(self) -> None:
        """Scaling rounds (ceiling, throughput, latency, idle CPU, drain), backlogs, sink routes."""
        await self.scaling_rounds()
        await self.backlogs()
        if self.options.sink_events:
            await self.sinks()

    async def scaling_rounds(self) -> None:
        """Each worker count in interleaved rounds, so that a spell of load from outside falls
        on all of them; each figure is the median of its rounds."""
        options = self.options
        counts = sorted(set(options.scaling) | {options.workers})
        for round_no, count in itertools.product(range(options.rounds), counts):
            label = f", round {round_no + 1} of {options.rounds}" if options.rounds > 1 else ""
            say(f"[1] arq no-op ceiling, {count} worker process(es){label}")
            ceiling = await noop_ceiling.measure(self.settings, self.fleet, count, options.events)
            _add(self.results.ceiling_runs, self.results.ceiling, count, ceiling)
            say(f"    {ceiling:,.0f} jobs/s")
            say(f"[2] end-to-end throughput, {count} worker process(es){label}")
            rate = await self.throughput(count, first_round=round_no == 0)
            say(f"    {rate:,.0f} events/s  (ratio {rate / ceiling:.2f})")
            if count == options.workers and round_no == 0:
                await self.latencies(rate)
                await self.idle()
            if options.drain_rows:
                # The fleet of the end-to-end run, still warm, drains a backlog.
                say(f"[6] backlog of {options.drain_rows:,} rows, {count} worker process(es){label}")
                drained, busy = await scaling.drain(self.ledger, self.fleet, options.drain_rows)
                self.results.drain_runs.setdefault(count, []).append(drained)
                self.results.drain_cores_busy.setdefault(count, []).append(busy)
                say(f"    {drained:,.0f} events/s, {busy:.2f} of {os.cpu_count()} cores busy")
            self.fleet.stop()

    async def throughput(self, count: int, *, first_round: bool) -> float:
        """Start the fleet, warm it up and measure; the CPU per 1,000 events of a first round."""
        self.fleet.start(count)
        await self.ledger.warm_up(self.fleet)
        events = self.options.events
        before = throughput.cpu_seconds(self.fleet, self.servers)
        rate = await throughput.measure(self.ledger, self.fleet, events, self.options.producers)
        per_1000 = throughput.per_1000(before, throughput.cpu_seconds(self.fleet, self.servers), events)
        _add(self.results.throughput_runs, self.results.throughput, count, rate)
        if first_round:
            known = [v for v in per_1000.values() if v is not None]
            self.results.cpu_by_workers[count] = {**per_1000, "all": sum(known) if known else None}
            if count == self.options.workers:
                self.results.cpu_per_1000 = per_1000
        return rate

    async def latencies(self, capacity: float) -> None:
        """Latency at each fixed rate, and at a fraction of the ``capacity`` just measured."""
        rates = list(self.options.latency_rates)
        if self.options.latency_at_capacity:
            rates.append(round(capacity * self.options.latency_at_capacity))
        for rate in rates:
            say(f"[3] latency at {rate:.0f} events/s offered, open loop")
            lat = await latency.measure(
                self.ledger, self.fleet, rate, self.options.latency_seconds, self.options.producers
            )
            self.results.latency[rate] = lat
            say(f"    p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms")

    async def idle(self) -> None:
        """Idle CPU of the running relay and workers."""
        say(f"[8] idle CPU over {self.options.idle_seconds:g} s, nothing to do")
        self.results.idle_cpu = await throughput.idle_cpu(self.fleet, self.options.idle_seconds)
        say("    " + ", ".join(f"{k} {v:.2f} %" for k, v in self.results.idle_cpu.items()))

    async def backlogs(self) -> None:
        """The backlog drained in batch jobs, then (if asked) one row per job."""
        rows, workers = self.options.backlog, self.options.workers
        say(f"[4] backlog of {rows:,} rows, drained by the relay and {workers} worker process(es)")
        self.results.backlog = await backlog.measure(self.ledger, self.fleet, rows, workers)
        b = self.results.backlog
        say(f"    {b['drain_events_per_s']:,.0f} events/s, relay peak RSS {b['relay_peak_rss_mb']:.0f} MB")
        if self.options.backlog_per_row:
            say("[4b] the same backlog with one row per job (JOB_BATCH_SIZE=1)")
            per_row = await backlog.measure_per_row(self.ledger, self.fleet, rows, workers)
            self.results.backlog_per_row = per_row
            say(f"    {per_row['drain_events_per_s']:,.0f} events/s")

    async def sinks(self) -> None:
        """Each sink route with the reservation path's worker count, then the webhook answering
        after 50 ms with 1 and with 2 workers."""
        events, workers = self.options.sink_events, self.options.workers
        place = sink_routes.Place(self.settings, self.servers, self.fleet, self.workdir, self.tag)
        for route in measured(self.options):
            say(f"[9] sink route {route.label}: {events:,} events in one transaction, {workers} worker(s)")
            result = await sink_routes.measure(route, place, events, workers)
            self.results.sinks[route.name] = result
            _say_sink(result)
        slow = webhook_route.route(delay_ms=50)
        for count in (1, 2):
            say(f"[9] sink route {slow.label}: {events:,} events, {count} worker(s)")
            result = await sink_routes.measure(slow, place, events, count)
            self.results.webhook_50ms[count] = result
            _say_sink(result)


def _say_sink(result: dict[str, Any]) -> None:
    if "skipped" in result:
        say(f"    skipped: {result['skipped']}")
        return
    say(
        f"    {result['events_per_s']:,.0f} events/s, {result['delivered']:,} delivered, "
        f"longest idle in transaction {result['longest_idle_in_transaction_s']:.2f} s"
    )
