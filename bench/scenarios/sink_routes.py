"""[9] Sink routes: rows of a routed kind committed on the primary in one transaction, delivered by
one sink (:mod:`bench.sinks`) to a real local server; events/s from the commit to the last
``finished``, the messages the destination holds, the relay's and workers' CPU, and the longest any
session sat idle in a transaction meanwhile."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from bench import BenchError
from bench.activity import IdleInTransaction
from bench.fleet import Fleet, listening_pid, tree_cpu
from bench.scenarios.scaling import busy
from bench.scenarios.throughput import CpuSeconds, cpu_seconds
from bench.scenarios.throughput import per_1000 as per_1000_events
from bench.servers import Servers
from bench.sinks import Destination, SinkRoute, Unavailable
from bench.sql import query
from outbox_relay.db import Connection, connect
from outbox_relay.settings import Settings

#: The routed kinds: ``benchev.<route name>``.
KIND_PREFIX = "benchev."
#: Rows pushed through first (per worker: a job each takes 50), so that start-up and the sinks'
#: first connections are not measured.
WARM_UP_ROWS = 100


@dataclass(frozen=True)
class Place:
    """What every sink run shares: the databases, the fleet, a scratch directory, the run's tag."""

    settings: Settings
    servers: Servers
    fleet: Fleet
    workdir: Path
    tag: str

    def databases(self) -> list[str]:
        """The service and primary databases' names (whose sessions are watched)."""
        urls = [self.settings.require_database_url(), self.settings.require_primary_url()]
        return [urlsplit(url).path.lstrip("/") for url in urls]


@dataclass(frozen=True)
class Batch:
    """Rows committed in one transaction: their id range and the primary's clock at the commit."""

    first: int
    last: int
    committed_at: float


async def measure(route: SinkRoute, place: Place, events: int, workers: int) -> dict[str, Any]:
    """``events`` rows through ``route`` with ``workers`` worker processes (skipped, with the reason,
    when its destination cannot be had)."""
    try:
        async with route.open(place.workdir, f"{place.tag}_{uuid.uuid4().hex[:6]}") as destination:
            return await _run(route, destination, place, events, workers)
    except Unavailable as exc:
        return {"skipped": str(exc)}


class CpuMeter:
    """CPU seconds of the relay, the workers, PostgreSQL, Redis, the destination's server and the bench
    itself, and the machine's cores busy (and how many of them by any other process), between
    :meth:`start` and :meth:`stop`."""

    def __init__(self, place: Place, destination: Destination) -> None:
        self.place = place
        self.pid = listening_pid(destination.port) if destination.port else None
        self._before: CpuSeconds = {}
        self._machine: Any = None
        self._started = 0.0

    def _now(self) -> CpuSeconds:
        destination = tree_cpu(self.pid, include_reaped=False) if self.pid else None
        own = psutil.Process().cpu_times()  # this process alone: its children are counted above
        servers = cpu_seconds(self.place.fleet, self.place.servers)
        return {**servers, "destination": destination, "bench": own.user + own.system}

    def start(self) -> None:
        """From now."""
        self._before, self._machine, self._started = self._now(), psutil.cpu_times(), time.monotonic()

    def stop(self, events: int) -> dict[str, Any]:
        """Until now: CPU seconds per 1,000 events of each (None: not measured here), cores busy."""
        cores = busy(self._machine, psutil.cpu_times())
        elapsed = time.monotonic() - self._started
        per_1000 = per_1000_events(self._before, self._now(), events)
        known = sum(v for v in per_1000.values() if v is not None) * events / 1000
        relay, workers = per_1000["relay"], per_1000["workers"]
        per_1000["relay_and_workers"] = (relay or 0.0) + (workers or 0.0)
        other = max(cores - known / elapsed, 0.0) if elapsed > 0 else None
        return {"cpu_seconds_per_1000_events": per_1000, "cores_busy": cores, "cores_busy_other": other}


async def _run(
    route: SinkRoute, destination: Destination, place: Place, events: int, workers: int
) -> dict[str, Any]:
    kind = KIND_PREFIX + route.name
    fleet = place.fleet
    primary = await connect(place.settings.require_primary_url())
    service = await connect(place.settings.require_database_url())
    own = [primary.get_server_pid(), service.get_server_pid()]
    watch = IdleInTransaction(place.servers.admin_url, place.databases(), own)
    meter = CpuMeter(place, destination)
    try:
        with fleet.extra_env({"OUTBOX_RELAY_ROUTES": f"{KIND_PREFIX}*={route.sink}", **destination.env}):
            async with watch:
                fleet.start(workers)
                try:
                    warm = await _commit(primary, kind, WARM_UP_ROWS * workers)
                    await _wait_ended(service, fleet, warm, timeout=120)
                    received_before = await destination.count()
                    meter.start()
                    batch = await _commit(primary, kind, events)
                    await _wait_ended(service, fleet, batch, timeout=600)
                    cpu = meter.stop(events)
                finally:
                    fleet.stop()
        outcome = await service.fetchrow(query("routed_outcome"), batch.first, batch.last)
        assert outcome is not None
        delivered = await destination.count() - received_before
    finally:
        await primary.close()
        await service.close()
    seconds = float(outcome["last_finished"] or batch.committed_at) - batch.committed_at
    # the delivery alone: without the replication of the batch and the relay's first pass over it
    steady = float(outcome["last_finished"] or 0.0) - float(outcome["first_finished"] or 0.0)
    result: dict[str, Any] = {
        "events": events,
        "workers": workers,
        "events_per_s": events / seconds if seconds > 0 else None,
        "seconds": seconds,
        "events_per_s_first_to_last_finished": events / steady if steady > 0 else None,
        "delivered": delivered,
        "failed_rows": int(outcome["failed"]),
        **cpu,
        "longest_idle_in_transaction_s": watch.longest,
        "longest_idle_in_transaction_session": watch.session,
        "activity_samples": watch.samples,
    }
    if outcome["error"]:
        result["error"] = outcome["error"]
    return result


async def _commit(primary: Connection, kind: str, rows: int) -> Batch:
    """``rows`` rows of ``kind`` inserted on the primary in one transaction."""
    prefix = f"{kind}-{uuid.uuid4().hex[:8]}-"
    async with primary.transaction():
        ids = await primary.fetchrow(query("insert_routed_rows"), prefix, kind, rows)
    assert ids is not None
    committed_at = float(await primary.fetchval(query("now_epoch")))
    return Batch(int(ids["first"]), int(ids["last"]), committed_at)


async def _wait_ended(service: Connection, fleet: Fleet, batch: Batch, *, timeout: float) -> None:
    """Until every row of ``batch`` arrived on the service database and ended (finished or failed)."""
    deadline = time.monotonic() + timeout
    pending = await service.prepare(query("routed_pending"))
    while (left := int(await pending.fetchval(batch.first, batch.last))) > 0:
        fleet.check_alive()
        if time.monotonic() > deadline:
            total = batch.last - batch.first + 1
            raise BenchError(f"a sink route ended only {total - left} of {total} events in {timeout:g} s")
        await asyncio.sleep(0.02)
