"""A chaos soak: reservations stream while faults strike at random moments from a fixed seed.

Two relays (one active, one standing by) and two workers run as CLI
subprocesses against a PostgreSQL and a Redis server this module owns. While
rows stream in, a seeded random schedule SIGKILLs or SIGSTOPs/SIGCONTs the
active relay, the standby and the workers, restarts Redis (empty), restarts
PostgreSQL and terminates the services' sessions with ``pg_terminate_backend``.
A killed process is started again, as a supervisor would. Afterwards every row
is ``finished`` or ``failed`` with its reason, each reservation is settled at
most once (exactly once for a finished row) and money is conserved.

The normal suite runs about two minutes (seed 7). A long soak:
``OUTBOX_RELAY_SOAK_SECONDS=1800 OUTBOX_RELAY_SOAK_SEED=42 pytest tests/integration/test_chaos.py``;
the schedule and the outcome are printed (``-s``) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import pytest

from tests.conftest import OutboxEnv
from tests.helpers import Service, Services, cli_env
from tests.integration.test_faults import (
    ACCOUNTS,
    EXPECTED_STATE,
    OPENING_BALANCE,
    Load,
    ensure_up,
    env,  # noqa: F401  (fixture)
    prepare_load,
    read_ledger,
    servers,  # noqa: F401  (fixture)
)
from tests.servers import PgServer, RedisServer

SOAK_SECONDS = float(os.environ.get("OUTBOX_RELAY_SOAK_SECONDS", "110"))
SEED = int(os.environ.get("OUTBOX_RELAY_SOAK_SEED", "7"))
#: Rows committed per second while the faults strike.
RATE = 20
#: Seconds between two faults: drawn uniformly from this range.
FAULT_GAP = (3.0, 7.0)
FAULTS = (
    "kill_active_relay",
    "stop_active_relay",
    "kill_standby",
    "stop_standby",
    "kill_worker",
    "stop_worker",
    "restart_redis",
    "restart_postgres",
    "terminate_backends",
)
UPSERT = (
    "INSERT INTO outbox_relay.outbox (correlation_id, outcome)"
    " SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT (correlation_id) DO NOTHING"
)


class Fleet:
    """The relays and workers under test, by role; restarts what was killed."""

    def __init__(self, services: Services, cli: dict[str, str]) -> None:
        self.services = services
        self.cli = cli
        self.relays: dict[str, Service] = {}
        self.workers: dict[str, Service] = {}
        self.restarts: Counter[str] = Counter()

    def start_relay(self, name: str) -> None:
        self.relays[name] = self.services.start_relay(name, self.cli)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self.services.start_worker(name, self.cli)

    async def active_relay(self, service_url: str) -> tuple[str, Service] | None:
        """The relay whose pid holds the lease (None while the database is away)."""
        try:
            conn = await asyncpg.connect(service_url, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        try:
            holder = await conn.fetchval("SELECT holder FROM outbox_relay.relay_lease")
        except (OSError, asyncpg.PostgresError):
            return None
        finally:
            conn.terminate()
        for name, relay in self.relays.items():
            if holder and holder.split(":")[1] == str(relay.proc.pid) and relay.running():
                return name, relay
        return None

    def revive(self) -> None:
        """Start again every process that was killed (as systemd or Kubernetes would)."""
        for name, relay in list(self.relays.items()):
            if not relay.running():
                self.restarts[name] += 1
                self.start_relay(name)
        for name, worker in list(self.workers.items()):
            if not worker.running():
                self.restarts[name] += 1
                self.start_worker(name)

    def resume_all(self) -> None:
        for service in [*self.relays.values(), *self.workers.values()]:
            if service.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(service.proc.pid, signal.SIGCONT)


async def stream(url: str, rows: list[tuple[str, str]], deadline: float) -> None:
    """Commit the rows at RATE a second until all are in, retrying across outages (idempotently)."""
    chunk = max(1, RATE // 10)
    start = 0
    conn: Any = None
    step_at = time.monotonic()
    while start < len(rows):
        batch = rows[start : start + chunk]
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(url, timeout=3)
            await conn.execute(UPSERT, [c for c, _ in batch], [o for _, o in batch], timeout=5)
        except Exception:  # any client error during an outage: reconnect and retry
            # (asyncpg can raise InternalClientError on a connection cut mid-statement)
            if conn is not None:
                conn.terminate()
            conn = None
            await asyncio.sleep(0.2)  # the database is away: try this batch again shortly
            continue
        start += chunk
        step_at += chunk / RATE
        await asyncio.sleep(max(0.0, min(step_at, deadline) - time.monotonic()))  # pacing the load
    if conn is not None:
        await conn.close()


async def terminate_backends(url: str) -> int:
    """pg_terminate_backend every session of the services (relays' listeners, pools, workers)."""
    conn = await asyncpg.connect(url, timeout=3)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'outbox_relay%' AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def settle_check(service_url: str, load: Load) -> dict[str, int]:
    """Every row finished or failed with its reason, reservations settled at most once, money conserved."""
    rows, balances, money = await read_ledger(service_url)
    assert set(rows) == set(load.outcomes), "outbox rows lost or made up"
    pending = sorted(cid for cid, r in rows.items() if r["status"] not in ("finished", "failed"))
    assert not pending, f"{len(pending)} rows never finished, e.g. {pending[:5]}"
    reasonless = [cid for cid, r in rows.items() if r["status"] == "failed" and not r["last_error"]]
    assert not reasonless, f"failed rows without a reason: {reasonless[:5]}"
    expected = dict.fromkeys((f"acc-{i}" for i in range(ACCOUNTS)), OPENING_BALANCE)
    for cid, row in rows.items():
        outcome = load.outcomes[cid]
        if row["status"] == "finished":
            wanted = EXPECTED_STATE[outcome]
            assert row["state"] == wanted, f"{cid} finished but its reservation is {row['state']}"
        else:
            assert row["state"] == "reserved", f"{cid} failed but its reservation is {row['state']}"
        if row["state"] in ("reserved", "burned"):
            expected[load.accounts[cid]] -= load.amounts[cid]
    assert balances == expected, "a reservation was settled more than once, or not at all"
    assert money == load.money, f"money not conserved: {load.money} before, {money} after"
    return Counter(r["status"] for r in rows.values())


@pytest.mark.slow
async def test_chaos_soak_loses_nothing_and_settles_each_reservation_once(
    env: OutboxEnv,  # noqa: F811
    services: Services,
    servers: tuple[PgServer, RedisServer],  # noqa: F811
) -> None:
    """Random SIGKILL/SIGSTOP of relays and workers, Redis and PostgreSQL restarts and terminated
    sessions (seeded): every row ends finished or failed with its reason, money conserved."""
    pg, redis = servers
    rng = random.Random(SEED)
    load = await prepare_load(env.service_url, int(SOAK_SECONDS * RATE), prefix="chaos")
    cli = cli_env(
        env.env(
            job_timeout="2",
            requeue_after="5",
            sweep_interval="1",
            retry_backoff="0.2",
            retry_backoff_max="2",
            max_attempts="100",
        )
    )
    fleet = Fleet(services, cli)
    fleet.start_relay("relay-a")
    await services.ready(fleet.relays["relay-a"], role="active")
    fleet.start_relay("relay-b")
    for name in ("worker-1", "worker-2"):
        fleet.start_worker(name)
    for worker in fleet.workers.values():
        await services.ready(worker, role="worker")

    faults: Counter[str] = Counter()
    schedule: list[str] = []
    resumes: list[tuple[float, Service]] = []
    started = time.monotonic()
    deadline = started + SOAK_SECONDS
    producer = asyncio.create_task(stream(env.service_url, load.rows, deadline))

    async def in_thread(fn: Callable[[], None]) -> None:
        await asyncio.to_thread(fn)

    try:
        next_fault = started + rng.uniform(*FAULT_GAP)
        while time.monotonic() < deadline:
            now = time.monotonic()
            for due, service in [r for r in resumes if r[0] <= now]:
                resumes.remove((due, service))
                if service.running():
                    os.kill(service.proc.pid, signal.SIGCONT)
            fleet.revive()
            if now >= next_fault:
                kind = rng.choice(FAULTS)
                pause = rng.uniform(2.0, 25.0)
                target: Service | None = None
                action: Coroutine[Any, Any, Any] | None = None
                if kind in ("kill_active_relay", "stop_active_relay", "kill_standby", "stop_standby"):
                    active = await fleet.active_relay(env.service_url)
                    if active is not None:
                        others = [s for n, s in fleet.relays.items() if n != active[0]]
                        target = active[1] if "active" in kind else others[0]
                elif kind in ("kill_worker", "stop_worker"):
                    target = fleet.workers[rng.choice(sorted(fleet.workers))]
                elif kind == "restart_redis":
                    action = in_thread(redis.restart)
                elif kind == "restart_postgres":
                    action = in_thread(pg.restart)
                else:
                    action = terminate_backends(env.service_url)
                if target is not None and target.running():
                    if kind.startswith("kill"):
                        target.proc.kill()
                        target.proc.wait(5)
                    else:
                        os.kill(target.proc.pid, signal.SIGSTOP)
                        resumes.append((now + pause, target))
                    faults[kind] += 1
                    schedule.append(f"{now - started:6.1f}s {kind} {target.name}")
                elif action is not None:
                    with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
                        await action
                    faults[kind] += 1
                    schedule.append(f"{now - started:6.1f}s {kind}")
                next_fault = time.monotonic() + rng.uniform(*FAULT_GAP)
            await asyncio.sleep(0.1)  # the chaos loop's tick
        fleet.resume_all()
        await ensure_up(pg, redis)
        fleet.revive()
        await asyncio.wait_for(producer, 120)
    finally:
        fleet.resume_all()
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer

    async def all_done() -> bool:
        try:
            conn = await asyncpg.connect(env.service_url, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        try:
            sql = "SELECT count(*) FROM outbox_relay.outbox WHERE status IN ('finished', 'failed')"
            return int(await conn.fetchval(sql)) == len(load.rows)
        finally:
            await conn.close()

    summary = (
        f"seed={SEED} seconds={SOAK_SECONDS:.0f} rows={len(load.rows)} faults={dict(sorted(faults.items()))}"
        f" restarts={dict(fleet.restarts)}\n" + "\n".join(schedule)
    )
    print(summary)
    await services.wait(all_done, timeout=180, message=f"every row finished or failed\n{summary}")
    try:
        outcome = await settle_check(env.service_url, load)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{summary}\n{services.tails()}") from None
    print(f"outcome: {dict(outcome)}")
    assert sum(faults.values()) >= SOAK_SECONDS / 10, f"too few faults struck: {summary}"
