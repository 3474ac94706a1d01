"""Shared test helpers: polling with a deadline, running services, producing rows, the CLI, and the
signals a test waits on (``/readyz`` of a process, the relay's lease row) instead of log lines."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from outbox_relay.composition import relay_process, worker_process
from outbox_relay.devtools.embedded import free_port
from outbox_relay.handlers import HandlerRegistry, registry
from outbox_relay.identity import job_namespace
from outbox_relay.queue import ConsumerStats
from outbox_relay.relay import Relay
from outbox_relay.settings import Settings
from outbox_relay.sql import query

REPO = Path(__file__).resolve().parent.parent


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 15.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy (or an awaitable of it); fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message} (last value: {last!r})")


async def equals(value: Awaitable[Any], expected: Any) -> bool:
    """True when ``value`` comes to ``expected`` (a predicate for :func:`wait_until`)."""
    return bool(await value == expected)


@contextlib.asynccontextmanager
async def running_relay(settings: Settings) -> AsyncIterator[Relay]:
    """Run a relay in this event loop; stop it (and wait for it) on exit."""
    stop = asyncio.Event()
    process = await relay_process(settings, stop)  # what `run` composes
    task = asyncio.create_task(process.run(), name="test.relay")
    try:
        yield process.relay
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, handlers: HandlerRegistry = registry
) -> AsyncIterator[asyncio.Task[ConsumerStats]]:
    """Run a worker in this event loop; stop it (and wait for it) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker_process(settings, handlers, stop), name="test.worker")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def queue_of(settings: Settings) -> tuple[str, str]:
    """The queue name a test set explicitly, and its job-id namespace."""
    assert settings.queue_name is not None, "this test names its queue"
    return settings.queue_name, job_namespace(settings.queue_name)


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
    return {
        r["correlation_id"]: r["status"]
        for r in await conn.fetch("SELECT correlation_id, status FROM outbox_relay.outbox")
    }


async def count_status(conn: Any, *statuses: str) -> int:
    """How many rows are in any of ``statuses``."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM outbox_relay.outbox WHERE status = ANY($1::text[])", list(statuses)
        )
    )


async def money_total(conn: Any) -> int:
    """Σ balance + Σ amount of reserved and burned reservations (conserved)."""
    return int(
        await conn.fetchval(
            "SELECT (SELECT coalesce(sum(balance), 0) FROM ledger.accounts)"
            " + (SELECT coalesce(sum(amount), 0) FROM ledger.reservations"
            "    WHERE state IN ('reserved', 'burned'))"
        )
    )


def cli_env(settings_env: Mapping[str, str], **extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: ours minus any OUTBOX_RELAY_*, plus ``settings_env``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
    env.update(settings_env)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, env: Mapping[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
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


async def connect(url: str) -> asyncpg.Connection:
    """A plain connection for the test's own queries."""
    return await asyncpg.connect(url)


# -- signals: /readyz of a process, the relay's lease row ---------------------------


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, Any]:
    """(status, body) of GET ``path`` on ``host`` (loopback): JSON decoded except for /metrics; (0, None)
    when nothing answers."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http,
            http.get(f"http://{host}:{port}{path}") as response,
        ):
            if path == "/metrics":
                return response.status, await response.text()
            return response.status, await response.json()
    except (aiohttp.ClientError, TimeoutError):
        return 0, None


async def wait_ready(
    port: int, *, role: str | None = None, ready: bool = True, timeout: float = 30.0, host: str = "127.0.0.1"
) -> dict[str, Any]:
    """Poll ``/readyz`` on ``port`` until it says ``ready`` (and ``role``, when given); its body.

    Roles: ``active`` and ``standby`` for a relay, ``worker`` for a worker."""

    async def answered() -> dict[str, Any] | None:
        _, body = await http_get(port, "/readyz", host)
        if isinstance(body, dict) and body.get("ready") is ready and role in (None, body.get("role")):
            return body
        return None

    wanted = f"ready={ready}" + (f" role={role}" if role else "")
    result: dict[str, Any] = await wait_until(
        answered, timeout=timeout, interval=0.05, message=f"/readyz on port {port} to say {wanted}"
    )
    return result


async def idle(service: Service) -> bool:
    """True when the worker answers /metrics with no job in flight."""
    assert service.port is not None
    status, text = await http_get(service.port, "/metrics", service.host)
    return status == 200 and "outbox_relay_worker_jobs_in_flight 0.0" in text


async def lease(url: str) -> asyncpg.Record | None:
    """The relay lease row (holder, epoch, expires_at, valid); None while the database is away."""
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return None
    try:
        record: asyncpg.Record | None = await conn.fetchrow(query("lease_state"))
        return record
    finally:
        await conn.close()


async def wait_relay_active(url: str, *, after_epoch: int = 0, timeout: float = 30.0) -> int:
    """Wait until a relay holds a valid lease of an epoch above ``after_epoch``; that epoch."""

    async def leading() -> int | None:
        record = await lease(url)
        if record is not None and record["valid"] and record["epoch"] > after_epoch:
            return int(record["epoch"])
        return None

    epoch: int = await wait_until(
        leading, timeout=timeout, interval=0.05, message=f"a relay lease of an epoch above {after_epoch}"
    )
    return epoch


# -- CLI services in subprocesses (fault and acceptance tests) ---------------------


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a subprocess log, headed by its name (for failure messages)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"--- {path.name}: no log"
    return f"--- {path.name} (last {lines} lines):\n" + "\n".join(text.splitlines()[-lines:])


class Service:
    """One ``python -m outbox_relay`` subprocess and its log."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        log: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        #: OUTBOX_RELAY_HTTP_PORT of the process (``/readyz``), when it serves one.
        self.port = port
        #: The address that HTTP server listens on (another network namespace's, for tests/hosts.py).
        self.host = host

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None

    def text(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self, needle: str) -> int:
        """Lines of the log that contain ``needle``."""
        return sum(needle in line for line in self.text().splitlines())


class Services:
    """CLI subprocesses started by one test: killed at the end, logs at hand for failure messages."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Service] = []
        #: set by :meth:`kill_all`: a test task still running past its end (a timeout) starts nothing
        self.closed = False

    def start(self, name: str, *args: str, env: Mapping[str, str], http: bool = False) -> Service:
        """Start ``python -m outbox_relay ARGS``; its output goes to ``<name>.log``. With ``http``
        it serves /healthz, /readyz and /metrics on a free port (:attr:`Service.port`)."""
        if self.closed:
            raise RuntimeError(f"{name} not started: this test's processes were all killed (its end)")
        log = self.directory / f"{name}.log"
        port = free_port() if http else None
        while port is not None and port in {service.port for service in self.started}:
            port = free_port()  # a port handed out but not yet bound could come back: not twice
        if port is not None:
            env = {**env, "OUTBOX_RELAY_HTTP_PORT": str(port)}
        service = Service(name, spawn_cli(*args, env=env, log=log), log, port)
        self.started.append(service)
        return service

    def start_relay(self, name: str, env: Mapping[str, str]) -> Service:
        """Start ``run``, serving /readyz (see :meth:`ready`)."""
        return self.start(name, "run", env=env, http=True)

    def start_worker(self, name: str, env: Mapping[str, str]) -> Service:
        """Start ``worker``, serving /readyz (see :meth:`ready`)."""
        return self.start(name, "worker", env=env, http=True)

    async def start_fleet(
        self,
        env: Mapping[str, str],
        *,
        relays: Sequence[str] = ("relay",),
        workers: Sequence[str] = ("worker",),
        timeout: float = 30.0,
    ) -> list[Service]:
        """Start the relays and workers named; return once the first relay is active, every other
        relay (started after it) stands by and each worker is ready: relays first, then workers."""
        first = [self.start_relay(relays[0], env)] if relays else []
        started_workers = [self.start_worker(name, env) for name in workers]
        for relay in first:
            await self.ready(relay, role="active", timeout=timeout)
        standbys = [self.start_relay(name, env) for name in relays[1:]]
        for relay in standbys:
            await self.ready(relay, role="standby", timeout=timeout)
        for worker in started_workers:
            await self.ready(worker, role="worker", timeout=timeout)
        return [*first, *standbys, *started_workers]

    async def ready(
        self, service: Service, *, role: str | None = None, ready: bool = True, timeout: float = 30.0
    ) -> None:
        """:func:`wait_ready` on ``service``'s /readyz, with the logs' tails in the failure message."""
        if service.port is None:
            raise ValueError(f"{service.name} serves no /readyz: start it with http=True")
        try:
            await wait_ready(service.port, role=role, ready=ready, timeout=timeout, host=service.host)
        except AssertionError as exc:
            raise AssertionError(f"{service.name}: {exc}\n{self.tails()}") from None

    def tails(self, lines: int = 30) -> str:
        """The end of every log, for a failure message."""
        return "\n".join(log_tail(s.log, lines) for s in self.started)

    async def wait(
        self, predicate: Callable[[], Any], *, timeout: float = 30.0, message: str = "condition"
    ) -> Any:
        """:func:`wait_until`, with the logs' tails in the failure message."""
        try:
            return await wait_until(predicate, timeout=timeout, interval=0.05, message=message)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tails()}") from None

    async def wait_logged(
        self, service: Service, needle: str, *, count: int = 1, timeout: float = 30.0
    ) -> None:
        """Wait until ``service`` logged ``count`` lines containing ``needle``."""

        async def logged() -> bool:
            return service.count(needle) >= count

        await self.wait(logged, timeout=timeout, message=f"{count} x {needle!r} in {service.name}.log")

    async def wait_exit(self, service: Service, *, timeout: float = 30.0) -> int:
        """Wait until ``service`` exits; its exit code."""

        async def exited() -> bool:
            return service.proc.poll() is not None

        await self.wait(exited, timeout=timeout, message=f"{service.name} to exit")
        return int(service.proc.returncode)

    def kill_all(self) -> None:
        """SIGKILL every process still running and reap them all; start no more."""
        self.closed = True
        for service in self.started:
            if service.proc.poll() is None:
                service.proc.kill()
        for service in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.proc.wait(10)
