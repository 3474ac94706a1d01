"""Two service databases on one Redis (contract §4 QUEUE_NAME, §5.5): they never take each other's work.

With no QUEUE_NAME each database's relay and workers derive a queue of its own
from the database's identity. With one QUEUE_NAME shared by mistake, every job
still names its database: a worker refuses another database's job loudly
(metric, ERROR line, /readyz, `doctor`) and puts it back for its own workers, so
no row is lost or finished by the wrong worker. Relays and workers run as CLI
processes, as an operator runs them.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from outbox_relay.arq_adapter.producer import redis_client
from outbox_relay.identity import DatabaseIdentity, derived_name, read_identity
from tests.conftest import OutboxEnv, create_outbox_env, drop_outbox_env
from tests.helpers import (
    Service,
    Services,
    cli_env,
    connect,
    count_status,
    equals,
    http_get,
    money_total,
    open_account,
    produce,
    reserve,
    run_cli,
)
from tests.servers import PgServer, RedisServer

ROWS = 12
#: Far beyond each test: a row must finish through its own queue, never by a late requeue sweep.
REQUEUE_AFTER = "600"


@pytest.fixture
async def other_env(pg_server: PgServer, redis_server: RedisServer) -> AsyncIterator[OutboxEnv]:
    """A second service database (and primary) on the same servers as ``outbox_env``."""
    env = await create_outbox_env(pg_server, redis_server.url())
    yield env
    await drop_outbox_env(env)


def process_env(env: OutboxEnv, queue_name: str | None) -> dict[str, str]:
    """The CLI environment of ``env``'s relay and workers, with ``queue_name`` (None: not set)."""
    values = env.env(requeue_after=REQUEUE_AFTER)
    del values["OUTBOX_RELAY_QUEUE_NAME"]
    if queue_name is not None:
        values["OUTBOX_RELAY_QUEUE_NAME"] = queue_name
    return cli_env(values)


async def produce_rows(env: OutboxEnv, prefix: str) -> int:
    """ROWS reservations and their outbox rows in ``env``'s service database; the money total."""
    conn = await connect(env.service_url)
    try:
        await open_account(conn, "acc", 1_000)
        for i in range(ROWS):
            await reserve(conn, "acc", 10, f"{prefix}-{i}")
            await produce(conn, f"{prefix}-{i}", "success")
        return await money_total(conn)
    finally:
        await conn.close()


async def settled(env: OutboxEnv, total: int) -> dict[str, Any]:
    """What became of ``env``'s rows: statuses, reservation states, money conserved, attempts."""
    conn = await connect(env.service_url)
    try:
        statuses = {
            r[0]: r[1]
            for r in await conn.fetch("SELECT status, count(*) FROM outbox_relay.outbox GROUP BY 1")
        }
        states = {
            r[0]: r[1] for r in await conn.fetch("SELECT state, count(*) FROM ledger.reservations GROUP BY 1")
        }
        attempts = await conn.fetchval("SELECT max(attempts) FROM outbox_relay.outbox")
        return {
            "statuses": statuses,
            "states": states,
            "conserved": await money_total(conn) == total,
            "balance": await conn.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'"),
            "max_attempts": attempts,
        }
    finally:
        await conn.close()


def finished_once() -> dict[str, Any]:
    """:func:`settled` of ROWS rows each finished once: every reservation burned once."""
    return {
        "statuses": {"finished": ROWS},
        "states": {"burned": ROWS},
        "conserved": True,
        "balance": 1_000 - 10 * ROWS,
        "max_attempts": 1,
    }


async def finished(env: OutboxEnv) -> int:
    """Finished rows of ``env``."""
    return await _count(env, "finished")


async def queued(env: OutboxEnv) -> int:
    """Queued rows of ``env``."""
    return await _count(env, "queued")


async def _count(env: OutboxEnv, status: str) -> int:
    conn = await connect(env.service_url)
    try:
        return await count_status(conn, status)
    finally:
        await conn.close()


async def identity_of(env: OutboxEnv) -> DatabaseIdentity:
    """``env``'s service database identity."""
    conn = await connect(env.service_url)
    try:
        return await read_identity(conn)
    finally:
        await conn.close()


async def derived_queue(env: OutboxEnv) -> str:
    """The queue name ``env``'s services derive with no QUEUE_NAME."""
    identity = await identity_of(env)
    return derived_name(identity.database, identity.system_identifier, identity.database_oid)


async def queue_length(redis_url: str, queue_name: str) -> int:
    """Jobs in the queue ``queue_name``."""
    redis = redis_client(redis_url, queue_name=queue_name, max_connections=1)
    try:
        return int(await redis.zcard(queue_name))
    finally:
        await redis.aclose(close_connection_pool=True)


async def foreign_refused(worker: Service) -> float:
    """``outbox_relay_worker_foreign_jobs_total`` of ``worker``."""
    assert worker.port is not None
    status, text = await http_get(worker.port, "/metrics")
    assert status == 200
    for line in str(text).splitlines():
        if line.startswith("outbox_relay_worker_foreign_jobs_total "):
            return float(line.split()[1])
    raise AssertionError("no outbox_relay_worker_foreign_jobs_total in /metrics")


async def test_two_services_with_no_queue_name_each_finish_their_own_rows(
    outbox_env: OutboxEnv, other_env: OutboxEnv, services: Services, redis_server: RedisServer
) -> None:
    """No QUEUE_NAME: two databases on one Redis get two queues; B's rows wait for B's worker
    (A's never takes them) and finish once it starts, each exactly once."""
    env_a, env_b = process_env(outbox_env, None), process_env(other_env, None)
    await services.start_fleet(env_a, relays=("relay-a",), workers=("worker-a",))
    relay_b = services.start_relay("relay-b", env_b)
    await services.ready(relay_b, role="active")
    total_a, total_b = await produce_rows(outbox_env, "a"), await produce_rows(other_env, "b")
    await services.wait(lambda: equals(finished(outbox_env), ROWS), message="A's rows finished")
    assert await finished(other_env) == 0, "A's worker finished B's rows"
    services.start_worker("worker-b", env_b)
    await services.wait(lambda: equals(finished(other_env), ROWS), message="B's rows finished by B's worker")
    assert await settled(outbox_env, total_a) == finished_once()
    assert await settled(other_env, total_b) == finished_once()
    doctors = [run_cli("doctor", "--json", env=env) for env in (env_a, env_b)]
    lines = [{c["name"]: c for c in json.loads(d.stdout)["checks"]} for d in doctors]
    queues = [line["queue name"]["detail"].split()[0] for line in lines]
    assert queues == [await derived_queue(outbox_env), await derived_queue(other_env)]
    assert queues[0] != queues[1]
    assert [line["queue database"]["status"] for line in lines] == ["ok", "ok"], doctors[0].stdout


async def test_two_services_sharing_a_queue_name_refuse_each_others_jobs_loudly_and_lose_nothing(
    outbox_env: OutboxEnv, other_env: OutboxEnv, services: Services, redis_server: RedisServer
) -> None:
    """One QUEUE_NAME for two databases: A's worker refuses B's jobs (metric, ERROR line naming both
    databases, /readyz not ready, `doctor` fails) and finishes none of B's rows; once A moves to its
    own queue and B's worker runs, every row of both finishes exactly once."""
    shared = f"shared_{uuid.uuid4().hex[:8]}"
    env_a, env_b = process_env(outbox_env, shared), process_env(other_env, shared)
    relay_a, worker_a = await services.start_fleet(env_a, relays=("relay-a",), workers=("worker-a",))
    relay_b = services.start_relay("relay-b", env_b)
    await services.ready(relay_b, role="active")
    total_a, total_b = await produce_rows(outbox_env, "a"), await produce_rows(other_env, "b")
    id_a, id_b = (await identity_of(outbox_env)).token, (await identity_of(other_env)).token

    await services.wait(lambda: equals(finished(outbox_env), ROWS), message="A's rows finished")
    await services.ready(worker_a, ready=False)
    _, body = await http_get(worker_a.port or 0, "/readyz")
    assert any("another service database" in reason and id_b in reason for reason in body["reasons"]), body
    assert await foreign_refused(worker_a) >= 1
    await services.wait_logged(worker_a, "refused a job of another service database")
    line = next(x for x in worker_a.text().splitlines() if "refused a job of another" in x)
    assert "ERROR" in line, line
    assert f"job_database={id_b}" in line, line
    assert f"worker_database={id_a}" in line, line
    doctor = run_cli("doctor", "--json", env=env_b)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["workers"]["status"] == "fail", "B has no worker: A's must not count for it"
    check = checks["queue database"]
    assert (check["status"], id_a in check["detail"], "unset" in check["fix"]) == ("fail", True, True), check
    assert await finished(other_env) == 0, "A's worker finished (or touched) B's rows"

    # The fix: A gets its own queue (QUEUE_NAME unset); B's worker takes B's jobs from the shared one.
    for service in (relay_a, worker_a):
        service.proc.terminate()
        await services.wait_exit(service)
    await services.start_fleet(process_env(outbox_env, None), relays=("relay-a2",), workers=("worker-a2",))
    services.start_worker("worker-b", env_b)
    await services.wait(lambda: equals(finished(other_env), ROWS), message="B's rows finished by B's worker")
    assert await settled(outbox_env, total_a) == finished_once()
    assert await settled(other_env, total_b) == finished_once()
    assert await queue_length(redis_server.url(), shared) == 0, "jobs were left in the shared queue"


async def test_upgrade_to_the_derived_queue_name_loses_nothing_and_applies_nothing_twice(
    outbox_env: OutboxEnv, services: Services, redis_server: RedisServer
) -> None:
    """Rows in flight in the old default queue (``outbox_relay``, its worker frozen) when relay and
    worker restart with no QUEUE_NAME: the new relay hands every queued row over again to the derived
    queue, the new worker finishes them; the old worker, resumed, drains the old jobs to no effect."""
    old_env, new_env = process_env(outbox_env, "outbox_relay"), process_env(outbox_env, None)
    relay_old, worker_old = await services.start_fleet(
        old_env, relays=("relay-old",), workers=("worker-old",)
    )
    worker_old.proc.send_signal(signal.SIGSTOP)
    try:
        total = await produce_rows(outbox_env, "flight")
        await services.wait(lambda: equals(queued(outbox_env), ROWS), message="every row queued")
        assert await queue_length(redis_server.url(), "outbox_relay") >= 1
        relay_old.proc.terminate()
        await services.wait_exit(relay_old)
        await services.start_fleet(new_env, relays=("relay-new",), workers=("worker-new",))
        await services.wait(lambda: equals(finished(outbox_env), ROWS), message="rows finished by the new")
        assert await queue_length(redis_server.url(), "outbox_relay") >= 1, (
            "the new worker took the old queue"
        )
    finally:
        worker_old.proc.send_signal(signal.SIGCONT)
    await services.wait(
        lambda: equals(queue_length(redis_server.url(), "outbox_relay"), 0), message="old queue drained"
    )
    worker_old.proc.terminate()
    await services.wait_exit(worker_old)
    assert await settled(outbox_env, total) == finished_once()
