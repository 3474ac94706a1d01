"""Fault injection: processes really SIGKILLed, servers really restarted, notifications really missed.

The relay and the workers run as CLI subprocesses (as an operator runs them)
against a PostgreSQL server and a Redis server owned by this module, so that a
test may kill and restart them. Every test ends with the same checks: nothing
lost (every produced row ``finished``, its reservation settled as its outcome
says) and money conserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psutil
import pytest
from redis.asyncio import Redis

from outbox_relay.composition import replication_config
from outbox_relay.db import quote_ident
from outbox_relay.replication import subscribe
from tests.conftest import OutboxEnv, create_outbox_env, drop_outbox_env
from tests.helpers import (
    Service,
    Services,
    cli_env,
    count_status,
    lease,
    money_total,
    open_account,
    wait_relay_active,
)
from tests.servers import PgServer, RedisServer, owned_postgres, owned_redis

ACCOUNTS = 8
OPENING_BALANCE = 1_000_000
EXPECTED_STATE = {"success": "burned", "failure": "reclaimed"}
INSERT = "INSERT INTO outbox_relay.outbox (correlation_id, outcome) VALUES ($1, $2)"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


# -- servers and databases ------------------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PgServer, RedisServer]]:
    """A PostgreSQL and a Redis server this module may kill and restart."""
    pg = owned_postgres()
    try:
        redis = owned_redis()
    except BaseException:
        pg.cleanup()
        raise
    yield pg, redis
    redis.cleanup()
    pg.cleanup()


async def _pg_up(pg: PgServer) -> bool:
    try:
        conn = await asyncpg.connect(pg.url(), timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False
    await conn.close()
    return True


async def _redis_up(url: str) -> bool:
    client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def ensure_up(pg: PgServer, redis: RedisServer) -> None:
    """Start whichever server an earlier (failed) test left down."""
    if not await _pg_up(pg):
        await asyncio.to_thread(pg.start)
    if not await _redis_up(redis.url()):
        await asyncio.to_thread(redis.start)


@pytest.fixture
async def env(servers: tuple[PgServer, RedisServer]) -> AsyncIterator[OutboxEnv]:
    """Fresh, migrated primary and service databases on the owned servers."""
    pg, redis = servers
    await ensure_up(pg, redis)
    outbox_env = await create_outbox_env(pg, redis.url())
    yield outbox_env
    await ensure_up(pg, redis)
    await drop_outbox_env(outbox_env)


# -- load: reservations, then outbox rows that settle them ----------------------------


@dataclass
class Load:
    """Reservations made in the service database and the outbox rows that will settle them."""

    outcomes: dict[str, str]
    amounts: dict[str, int]
    accounts: dict[str, str]
    money: int = 0
    rows: list[tuple[str, str]] = field(default_factory=list)


async def prepare_load(service_url: str, n: int, prefix: str = "job") -> Load:
    """Open accounts and reserve money for ``n`` correlation ids (a third of them will fail)."""
    cids = [f"{prefix}-{i}" for i in range(n)]
    load = Load(
        outcomes={cid: "failure" if i % 3 == 0 else "success" for i, cid in enumerate(cids)},
        amounts={cid: i % 9 + 1 for i, cid in enumerate(cids)},
        accounts={cid: f"acc-{i % ACCOUNTS}" for i, cid in enumerate(cids)},
    )
    load.rows = [(cid, load.outcomes[cid]) for cid in cids]
    conn = await asyncpg.connect(service_url)
    try:
        for i in range(ACCOUNTS):
            await open_account(conn, f"acc-{i}", OPENING_BALANCE)
        await conn.execute(
            "SELECT ledger.reserve(a, m, c) FROM unnest($1::text[], $2::bigint[], $3::text[]) AS t(a, m, c)",
            [load.accounts[c] for c in cids],
            [load.amounts[c] for c in cids],
            cids,
        )
        load.money = await money_total(conn)
    finally:
        await conn.close()
    return load


async def produce(url: str, rows: list[tuple[str, str]], *, chunk: int = 10, pause: float = 0.0) -> None:
    """Commit outbox rows as producers do, ``chunk`` per transaction (``pause`` paces the load)."""
    conn = await asyncpg.connect(url)
    try:
        for start in range(0, len(rows), chunk):
            await conn.executemany(INSERT, rows[start : start + chunk])
            if pause:
                await asyncio.sleep(pause)  # pacing the load, not synchronisation
    finally:
        await conn.close()


async def produce_at_once(url: str, rows: list[tuple[str, str]]) -> None:
    """Commit many outbox rows in one transaction: a backlog that saturates the workers."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO outbox_relay.outbox (correlation_id, outcome)"
            " SELECT * FROM unnest($1::text[], $2::text[])",
            [cid for cid, _ in rows],
            [outcome for _, outcome in rows],
        )
    finally:
        await conn.close()


async def read_ledger(service_url: str) -> tuple[dict[str, asyncpg.Record], dict[str, int], int]:
    """Each outbox row (status, last_error) with its reservation's state by correlation id, the
    accounts' balances, and the money total."""
    conn = await asyncpg.connect(service_url)
    try:
        records = await conn.fetch(
            "SELECT correlation_id, o.status, o.last_error, r.state"
            "  FROM outbox_relay.outbox o FULL JOIN ledger.reservations r USING (correlation_id)"
        )
        accounts = await conn.fetch("SELECT id, balance FROM ledger.accounts")
        money = await money_total(conn)
    finally:
        await conn.close()
    return {r["correlation_id"]: r for r in records}, {r["id"]: r["balance"] for r in accounts}, money


async def assert_settled(service_url: str, load: Load) -> None:
    """Nothing lost, every reservation settled once as its outcome says, money conserved."""
    rows, balances, money = await read_ledger(service_url)
    assert set(rows) == set(load.outcomes), "outbox rows lost or made up"
    pending = sorted(cid for cid, r in rows.items() if r["status"] not in ("finished", "failed"))
    assert not pending, f"{len(pending)} rows never finished, e.g. {pending[:5]}"
    failed = {cid: r["last_error"] for cid, r in rows.items() if r["status"] == "failed"}
    assert not failed, f"{len(failed)} rows failed, e.g. {list(failed.items())[:3]}"
    wrong = {cid: r["state"] for cid, r in rows.items() if r["state"] != EXPECTED_STATE[load.outcomes[cid]]}
    assert not wrong, f"{len(wrong)} reservations not settled as their outcome says, e.g. {list(wrong)[:5]}"
    expected = dict.fromkeys((f"acc-{i}" for i in range(ACCOUNTS)), OPENING_BALANCE)
    for cid, outcome in load.outcomes.items():
        # Reserved money leaves the balance; only a reclaim (failure) brings it back, exactly once.
        if outcome == "success":
            expected[load.accounts[cid]] -= load.amounts[cid]
    assert balances == expected, "a reservation was settled more than once, or not at all"
    assert money == load.money, f"money not conserved: {load.money} before, {money} after"


async def finished_count(url: str) -> int:
    """How many rows of the service database are finished."""
    conn = await asyncpg.connect(url)
    try:
        return await count_status(conn, "finished")
    finally:
        await conn.close()


def at_least_finished(url: str, n: int) -> Any:
    """A predicate for :meth:`Services.wait`: ``n`` rows or more are finished."""

    async def predicate() -> bool:
        return await finished_count(url) >= n

    return predicate


async def backends_waiting_on_locks(conn: Any, service: Service) -> list[int]:
    """The server pids of the database sessions of ``service`` that wait for a lock."""
    ports = [c.laddr.port for c in psutil.Process(service.proc.pid).net_connections(kind="tcp")]
    return [
        r["pid"]
        for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND client_port = ANY($1::int[])",
            ports,
        )
    ]


def assert_running(*started: Service) -> None:
    """Every service is still up."""
    for service in started:
        code = service.proc.returncode
        assert service.running(), f"{service.name} exited ({code}):\n{service.text()[-3000:]}"


def assert_plain_log(service: Service) -> None:
    """The log is plain: one timestamped line per event, no traceback."""
    text = service.text()
    assert "Traceback" not in text, f"traceback in {service.name}.log:\n{text[-3000:]}"
    odd = [line for line in text.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert not odd, f"{service.name}.log has lines that are not log lines: {odd[:5]}"


# -- the tests ------------------------------------------------------------------------


@pytest.mark.slow
async def test_standby_relay_takes_over_after_the_active_one_is_sigkilled(
    env: OutboxEnv, services: Services
) -> None:
    """A standby relay takes over within seconds of the active relay's SIGKILL, and every row finishes."""
    await subscribe(replication_config(env.settings()))
    load = await prepare_load(env.service_url, 1500)
    cli = cli_env(env.env())
    first, standby, worker = await services.start_fleet(cli, relays=("relay-a", "relay-b"))

    producer = asyncio.create_task(produce(env.primary_url, load.rows, pause=0.02))
    try:
        await services.wait(at_least_finished(env.service_url, 200), message="200 rows finished")
        assert not producer.done(), "the load ended before the relay was killed"
        first.proc.kill()
        killed_at = time.monotonic()
        await services.ready(standby, role="active", timeout=20)
        takeover = time.monotonic() - killed_at
        await producer
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer

    assert first.proc.wait(5) == -9
    assert takeover < 5.0, f"the standby took {takeover:.1f} s to take over\n{services.tails()}"
    assert standby.count("taking over") == 1
    await services.wait(
        at_least_finished(env.service_url, len(load.rows)), timeout=60, message="every row finished"
    )
    assert_running(standby, worker)
    await assert_settled(env.service_url, load)


@pytest.mark.slow
async def test_rows_finish_when_a_worker_is_sigkilled_mid_load(env: OutboxEnv, services: Services) -> None:
    """A worker SIGKILLed mid-transaction loses nothing: its jobs run on another worker, settled once."""
    load = await prepare_load(env.service_url, 3500)
    backlog, later = load.rows[:3000], load.rows[3000:]
    # A server session notices its client is gone only when it next talks to it, unless
    # told to check: without this the victim's waiting statement would still commit
    # once unblocked, and no work of the victim would be lost and run again.
    conn = await asyncpg.connect(env.service_url)
    try:
        await conn.execute(
            f"ALTER DATABASE {quote_ident(env.service_db)} SET client_connection_check_interval = '100ms'"
        )
    finally:
        await conn.close()
    # JOB_TIMEOUT=1: the in-progress key of a killed worker's job expires after 1 + 6 s.
    # MAX_ATTEMPTS=20: the rows held up by the test's lock below may time out once or twice.
    cli = cli_env(env.env(job_timeout="1", max_attempts="20"))
    relay, victim, survivor = await services.start_fleet(cli, workers=("worker-a", "worker-b"))

    # The test locks every 10th reservation: a job settling one of them waits inside
    # its transaction, so the victim is certain to die with uncommitted work.
    locked = [cid for cid, _ in backlog[::10]]
    blocker = await asyncpg.connect(env.service_url)
    conn = await asyncpg.connect(env.service_url)
    try:
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute(
            "SELECT 1 FROM ledger.reservations WHERE correlation_id = ANY($1::text[]) FOR UPDATE", locked
        )
        await produce_at_once(env.service_url, backlog)
        waiting = await services.wait(
            lambda: backends_waiting_on_locks(conn, victim), message="the victim waiting inside a transaction"
        )
        victim.proc.kill()
        assert victim.proc.wait(5) == -9
        killed_at = await conn.fetchval("SELECT clock_timestamp()")

        async def sessions_gone() -> bool:
            sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])"
            return not await conn.fetchval(sql, waiting)

        # Release the lock only once the server has aborted the victim's transactions.
        await services.wait(sessions_gone, message="the victim's sessions ended by the server")
        await lock.rollback()
        await produce(env.service_url, later, pause=0.02)
        await services.wait(
            at_least_finished(env.service_url, len(load.rows)), timeout=90, message="every row finished"
        )
        # The victim's jobs wait for their in-progress keys to expire (1 + 6 s) before they run again.
        recovered = await conn.fetchval(
            "SELECT count(*) FROM outbox_relay.outbox"
            " WHERE finished_at > $1::timestamptz + interval '6 seconds'",
            killed_at,
        )
    finally:
        await blocker.close()
        await conn.close()
    assert recovered > 0, "no job of the killed worker had to be run again"
    assert_running(relay, survivor)
    await assert_settled(env.service_url, load)


@pytest.mark.slow
async def test_rows_finish_when_redis_restarts_empty_mid_load(
    env: OutboxEnv, services: Services, servers: tuple[PgServer, RedisServer]
) -> None:
    """Redis restarted empty mid-load loses nothing: the relay sees the new run id and enqueues again."""
    _, redis = servers
    load = await prepare_load(env.service_url, 5500)
    backlog, later = load.rows[:5000], load.rows[5000:]
    # Small jobs, so that the backlog takes a while to drain.
    cli = cli_env(env.env(requeue_after="2", job_batch_size="10"))
    relay, worker = await services.start_fleet(cli)

    # A backlog: when Redis restarts, it holds many jobs, and loses them. The worker is
    # frozen meanwhile, so that the jobs are still there when Redis restarts (a quick
    # worker could otherwise drain them while a container restarts).
    await produce_at_once(env.service_url, backlog)
    await services.wait(at_least_finished(env.service_url, 200), message="200 rows finished")
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        conn = await asyncpg.connect(env.service_url)
        try:
            lost = await count_status(conn, "queued")
        finally:
            await conn.close()
        await asyncio.to_thread(redis.restart)
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    await produce(env.service_url, later, pause=0.02)

    await services.wait_logged(relay, "Redis restarted", timeout=30)
    await services.wait(
        at_least_finished(env.service_url, len(load.rows)), timeout=60, message="every row finished"
    )
    assert lost > 0, "no queued row when Redis restarted: the queue lost nothing"
    assert_running(relay, worker)
    await assert_settled(env.service_url, load)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_services_survive_a_service_database_restart_and_the_fast_path_resumes(
    env: OutboxEnv, services: Services, servers: tuple[PgServer, RedisServer], how: str
) -> None:
    """After the service database restarts or crashes, relay and worker reconnect and the fast path works."""
    pg, _ = servers
    load = await prepare_load(env.service_url, 5040)
    backlog, later = load.rows[:5000], load.rows[5000:]
    # The default sweep interval (5 s) and retry backoff (1 s, doubling): attempts
    # that fail while the database is away must not use up MAX_ATTEMPTS at once.
    cli = cli_env(env.env(retry_backoff="1", retry_backoff_max="60"))
    relay, worker = await services.start_fleet(cli)

    await produce_at_once(env.service_url, backlog)
    await services.wait(at_least_finished(env.service_url, 200), message="200 rows finished")
    before = await lease(env.service_url)
    assert before is not None
    if how == "restart":
        await asyncio.to_thread(pg.restart)
    else:
        await asyncio.to_thread(pg.kill)
        await services.ready(relay, ready=False)  # its session ended: it reconnects
        assert_running(relay, worker)
        await asyncio.to_thread(pg.start)
    unfinished = len(backlog) - await finished_count(env.service_url)
    assert unfinished > 0, "the backlog was done before the restart: nothing was in flight"

    # Active again in a new session: a new lease, and (once it LISTENs) active on /readyz.
    await wait_relay_active(env.service_url, after_epoch=before["epoch"], timeout=30)
    await services.ready(relay, role="active")
    await services.wait(
        at_least_finished(env.service_url, len(backlog)), timeout=60, message="the backlog finished"
    )
    assert_running(relay, worker)

    # Guarantee 4 after the reconnect: rows committed one by one finish within
    # a small fraction of the 5 s sweep interval.
    conn = await asyncpg.connect(env.service_url)
    try:
        for cid, outcome in later:
            await conn.execute(INSERT, cid, outcome)
            await asyncio.sleep(0.05)  # pacing the load, not synchronisation
        await services.wait(
            at_least_finished(env.service_url, len(load.rows)), timeout=30, message="every row finished"
        )
        latencies = sorted(
            await conn.fetchval(
                "SELECT array_agg(extract(epoch FROM finished_at - created_at)::float8)"
                "  FROM outbox_relay.outbox WHERE correlation_id = ANY($1::text[])",
                [cid for cid, _ in later],
            )
        )
    finally:
        await conn.close()
    fast = sum(latency < 1.0 for latency in latencies)
    assert fast >= 0.8 * len(latencies), (
        f"only {fast} of {len(latencies)} rows finished within 1 s after the restart "
        f"(median {latencies[len(latencies) // 2]:.2f} s, max {latencies[-1]:.2f} s)\n{services.tails()}"
    )
    assert_running(relay, worker)
    await assert_settled(env.service_url, load)


@pytest.mark.slow
async def test_services_started_while_the_servers_are_down_wait_and_then_work(
    env: OutboxEnv, services: Services, servers: tuple[PgServer, RedisServer]
) -> None:
    """`run` and `worker` started with PostgreSQL and Redis down keep retrying plainly, then work."""
    pg, redis = servers
    load = await prepare_load(env.service_url, 300)
    early, later = load.rows[:200], load.rows[200:]
    await produce(env.service_url, early, chunk=50)
    await asyncio.to_thread(pg.kill)
    await asyncio.to_thread(redis.kill)

    cli = cli_env(env.env())
    relay = services.start("relay", "run", env=cli)
    worker = services.start("worker", "worker", env=cli)
    for service in (relay, worker):
        await services.wait_logged(service, "cannot reach the service database", count=3)
    assert_running(relay, worker)

    await asyncio.to_thread(pg.start)
    for service in (relay, worker):
        await services.wait_logged(service, "cannot reach Redis", count=3)
    assert_running(relay, worker)

    await asyncio.to_thread(redis.start)
    await services.wait(
        at_least_finished(env.service_url, len(early)), timeout=60, message="early rows finished"
    )
    await produce(env.service_url, later)
    await services.wait(
        at_least_finished(env.service_url, len(load.rows)), timeout=30, message="every row finished"
    )
    assert_running(relay, worker)
    for service in (relay, worker):
        assert_plain_log(service)
    await assert_settled(env.service_url, load)


async def test_rows_finish_through_the_sweep_when_notifications_are_missed(
    env: OutboxEnv, services: Services
) -> None:
    """With the notify trigger disabled on the replica, replicated rows still finish through the sweep."""
    await subscribe(replication_config(env.settings()))
    conn = await asyncpg.connect(env.service_url)
    try:
        await conn.execute("ALTER TABLE outbox_relay.outbox DISABLE TRIGGER outbox_notify")
    finally:
        await conn.close()
    load = await prepare_load(env.service_url, 300)
    cli = cli_env(env.env(sweep_interval="0.5"))
    relay, worker = await services.start_fleet(cli)

    await produce(env.primary_url, load.rows, pause=0.02)
    await services.wait(
        at_least_finished(env.service_url, len(load.rows)), timeout=60, message="every row finished"
    )
    assert relay.count("sweep handed rows over") >= 1
    assert_running(relay, worker)
    await assert_settled(env.service_url, load)
