"""Shared test helpers: polling with a deadline, running services, producing rows, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg

from outbox_relay.handlers import HandlerRegistry, registry
from outbox_relay.jobs import JobQueue, redis_client
from outbox_relay.relay import Relay
from outbox_relay.settings import Settings
from outbox_relay.worker import WorkerStats, run_worker

REPO = Path(__file__).resolve().parent.parent


async def wait_until(
    predicate: Callable[[], Awaitable[Any]],
    *,
    timeout: float = 15.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message} (last value: {last!r})")


@contextlib.asynccontextmanager
async def running_relay(settings: Settings) -> AsyncIterator[Relay]:
    """Run a relay in this event loop; stop it (and wait for it) on exit."""
    stop = asyncio.Event()
    redis = redis_client(settings.redis_url.get_secret_value(), queue_name=settings.queue_name)
    queue = JobQueue(redis, queue_name=settings.queue_name, namespace=settings.job_namespace)
    relay = Relay(settings, queue, stop)
    task = asyncio.create_task(relay.run(), name="test.relay")
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await redis.aclose(close_connection_pool=True)


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, handlers: HandlerRegistry = registry
) -> AsyncIterator[asyncio.Task[WorkerStats]]:
    """Run a worker in this event loop; stop it (and wait for it) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, stop, handlers=handlers), name="test.worker")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def open_account(conn: Any, account: str, balance: int) -> None:
    """Open a ledger account by a plain INSERT."""
    await conn.execute("INSERT INTO ledger.accounts (id, balance) VALUES ($1, $2)", account, balance)


async def reserve(conn: Any, account: str, amount: int, correlation_id: str) -> None:
    """Reserve ``amount`` on ``account`` under ``correlation_id``."""
    await conn.execute("SELECT ledger.reserve($1, $2, $3)", account, amount, correlation_id)


async def produce(
    conn: Any,
    correlation_id: str,
    outcome: str | None = "success",
    *,
    kind: str = "reservation",
    payload: str = "{}",
) -> None:
    """Insert one outbox row as a producer does (its own transaction)."""
    await conn.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload) "
        "VALUES ($1, $2, $3, $4::jsonb)",
        correlation_id,
        kind,
        outcome,
        payload,
    )


async def produce_many(conn: Any, rows: list[tuple[str, str]]) -> None:
    """Insert many (correlation_id, outcome) reservation rows, one transaction each."""
    for cid, outcome in rows:
        await produce(conn, cid, outcome)


async def status_of(conn: Any) -> dict[str, str]:
    """correlation_id -> status of every outbox row."""
    return {r["correlation_id"]: r["status"] for r in await conn.fetch(
        "SELECT correlation_id, status FROM outbox_relay.outbox")}


async def count_status(conn: Any, *statuses: str) -> int:
    """How many rows are in any of ``statuses``."""
    return int(await conn.fetchval(
        "SELECT count(*) FROM outbox_relay.outbox WHERE status = ANY($1::text[])", list(statuses)))


async def money_total(conn: Any) -> int:
    """Σ balance + Σ amount of reserved and burned reservations (conserved)."""
    return int(await conn.fetchval(
        "SELECT (SELECT coalesce(sum(balance), 0) FROM ledger.accounts)"
        " + (SELECT coalesce(sum(amount), 0) FROM ledger.reservations"
        "    WHERE state IN ('reserved', 'burned'))"))


def cli_env(settings_env: Mapping[str, str], **extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: ours minus any OUTBOX_RELAY_*, plus ``settings_env``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
    env.update(settings_env)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m outbox_relay ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "outbox_relay", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def spawn_cli(*args: str, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m outbox_relay ARGS`` in the background, its output going to ``log``."""
    handle = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "outbox_relay", *args],
            env=dict(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    finally:
        handle.close()


async def connect(url: str) -> asyncpg.Connection:  # type: ignore[type-arg]
    """A plain connection for the test's own queries."""
    return await asyncpg.connect(url)
