"""No silent stall (contract 5.6): frozen relays and workers, blocked rows, clean stops.

Real processes (the CLI), real signals (SIGSTOP, SIGCONT, SIGTERM), real
servers; every test ends with the checks of the fault tests: nothing lost,
each reservation settled once, money conserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import asyncpg

from outbox_relay.relay.leadership import WORST_CASE_TAKEOVER
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env, lease
from tests.integration.test_faults import (
    INSERT,
    assert_plain_log,
    assert_running,
    assert_settled,
    at_least_finished,
    backends_waiting_on_locks,
    prepare_load,
    produce,
)


async def _lease(url: str) -> asyncpg.Record:
    """The relay lease row (the database is up)."""
    record = await lease(url)
    assert record is not None
    return record


async def _queued_by(url: str, epoch: int) -> dict[int, tuple[object, int]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT id, queued_at, queued_epoch FROM outbox_relay.outbox WHERE queued_epoch = $1", epoch
        )
    finally:
        await conn.close()
    return {r["id"]: (r["queued_at"], r["queued_epoch"]) for r in rows}


def _at_least_queued_by(url: str, epoch: int, n: int) -> Any:
    """A predicate for :meth:`Services.wait`: ``n`` rows or more are `queued` with ``epoch``."""

    async def predicate() -> bool:
        queued = await _queued_by(url, epoch)
        return len(queued) >= n

    return predicate


async def test_a_standby_takes_over_from_a_frozen_relay_and_the_resumed_one_changes_nothing(
    outbox_env: OutboxEnv, services: Services
) -> None:
    """SIGSTOP of the active relay: the standby is active within 20 s and rows keep finishing; after
    SIGCONT the old relay learns it lost its leadership, stands by, and changes no row the new one queued."""
    assert WORST_CASE_TAKEOVER < 20
    load = await prepare_load(outbox_env.service_url, 1200, prefix="frozen")
    cli = cli_env(outbox_env.env())
    first, standby, worker = await services.start_fleet(cli, relays=("relay-a", "relay-b"))
    old_epoch = (await _lease(outbox_env.service_url))["epoch"]

    producer = asyncio.create_task(produce(outbox_env.service_url, load.rows, pause=0.05))
    try:
        await services.wait(at_least_finished(outbox_env.service_url, 100), message="100 rows finished")
        os.kill(first.proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        await services.ready(standby, role="active", timeout=20)
        takeover = time.monotonic() - frozen_at
        new_epoch = (await _lease(outbox_env.service_url))["epoch"]
        assert new_epoch > old_epoch
        # Rows keep finishing while the old relay is still frozen.
        finished_then = await _finished(outbox_env.service_url)
        await services.wait(
            at_least_finished(outbox_env.service_url, finished_then + 50),
            timeout=20,
            message="rows finishing under the new leader",
        )
        # A fast worker finishes most rows before the relay's mark lands (the mark then skips them),
        # so freeze the worker too: what the new leader hands over now stays `queued`, marked by it.
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            await services.wait(
                _at_least_queued_by(outbox_env.service_url, new_epoch, 20),
                timeout=20,
                message="20 rows queued by the new leader",
            )
            before_resume = await _queued_by(outbox_env.service_url, new_epoch)
            os.kill(first.proc.pid, signal.SIGCONT)
            await services.ready(first, role="standby", timeout=20)
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        await producer
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer

    print(f"takeover after SIGSTOP: {takeover:.1f} s")
    assert takeover < 20.0, f"the standby took {takeover:.1f} s to take over\n{services.tails()}"
    await services.wait(
        at_least_finished(outbox_env.service_url, len(load.rows)), timeout=60, message="every row finished"
    )
    after = await _queued_by(outbox_env.service_url, new_epoch)
    changed = {i: (before_resume[i], after.get(i)) for i in before_resume if after.get(i) != before_resume[i]}
    assert not changed, f"the resumed relay changed rows the new leader queued: {list(changed.items())[:3]}"
    lease = await _lease(outbox_env.service_url)
    assert lease["epoch"] == new_epoch, "the resumed relay took the lease back"
    assert first.count("relay active") == 1, "the resumed relay became active again"
    assert_running(first, standby, worker)
    await assert_settled(outbox_env.service_url, load)


async def _finished(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox_relay.outbox WHERE status = 'finished'"))
    finally:
        await conn.close()


async def test_one_blocked_row_delays_no_other_row(outbox_env: OutboxEnv, services: Services) -> None:
    """One reservation held FOR UPDATE by another session for 30 s: every other row finishes fast
    (p90 under 1 s), the relay never waits on a lock, and the blocked row finishes once released."""
    load = await prepare_load(outbox_env.service_url, 500, prefix="blocked")
    blocked_cid = load.rows[0][0]
    # REQUEUE_AFTER=3: the sweep hands the blocked row over again and again while it is held.
    cli = cli_env(outbox_env.env(requeue_after="3", max_attempts="30", retry_backoff_max="2"))
    relay, worker = await services.start_fleet(cli)

    blocker = await asyncpg.connect(outbox_env.service_url)
    conn = await asyncpg.connect(outbox_env.service_url)
    try:
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute(
            "SELECT 1 FROM ledger.reservations WHERE correlation_id = $1 FOR UPDATE", blocked_cid
        )
        held_from = time.monotonic()
        for cid, outcome in load.rows:
            await conn.execute(INSERT, cid, outcome)
            await asyncio.sleep(0.05)  # pacing the load, not synchronisation
        others = [cid for cid, _ in load.rows[1:]]

        async def others_finished() -> bool:
            sql = (
                "SELECT count(*) FROM outbox_relay.outbox WHERE status = 'finished' AND correlation_id <> $1"
            )
            return int(await conn.fetchval(sql, blocked_cid)) == len(others)

        await services.wait(others_finished, timeout=30, message="every other row finished")
        status = await conn.fetchval(
            "SELECT status FROM outbox_relay.outbox WHERE correlation_id = $1", blocked_cid
        )
        assert status in ("new", "queued"), f"the blocked row is {status} while its reservation is held"
        remaining = 30.0 - (time.monotonic() - held_from)
        if remaining > 0:
            await asyncio.sleep(remaining)  # holding the lock for its full 30 s is the test's load
        await lock.rollback()
        await services.wait(
            at_least_finished(outbox_env.service_url, len(load.rows)), timeout=30, message="blocked row done"
        )
        latencies = sorted(
            await conn.fetchval(
                "SELECT array_agg(extract(epoch FROM finished_at - created_at)::float8)"
                "  FROM outbox_relay.outbox WHERE correlation_id = ANY($1::text[])",
                others,
            )
        )
        attempts = await conn.fetchval(
            "SELECT attempts FROM outbox_relay.outbox WHERE correlation_id = $1", blocked_cid
        )
    finally:
        await blocker.close()
        await conn.close()
    p90 = latencies[int(0.9 * len(latencies))]
    assert p90 < 1.0, f"p90 {p90:.2f} s, max {latencies[-1]:.2f} s for the other rows\n{services.tails()}"
    assert attempts > 1, "the blocked row's effect never timed out on the lock"
    assert "lock timeout" in worker.text()
    assert_running(relay, worker)
    await assert_settled(outbox_env.service_url, load)


async def test_sigterm_stops_run_and_worker_cleanly(outbox_env: OutboxEnv, services: Services) -> None:
    """SIGTERM of `run` and `worker` (after some work) exits 0 and logs no WARNING."""
    load = await prepare_load(outbox_env.service_url, 100, prefix="term")
    cli = cli_env(outbox_env.env())
    relay, standby, worker = await services.start_fleet(cli, relays=("relay", "standby"))
    await produce(outbox_env.service_url, load.rows)
    await services.wait(at_least_finished(outbox_env.service_url, len(load.rows)), message="rows finished")
    for service in (relay, standby, worker):
        service.proc.send_signal(signal.SIGTERM)
    for service in (relay, standby, worker):
        assert await services.wait_exit(service, timeout=20) == 0, service.text()[-2000:]
        assert " WARNING " not in service.text(), f"{service.name}.log:\n{service.text()[-2000:]}"
        assert_plain_log(service)
    await assert_settled(outbox_env.service_url, load)


async def test_a_worker_resumed_after_sigstop_logs_plain_lines_and_rows_finish_once(
    outbox_env: OutboxEnv, services: Services
) -> None:
    """A worker SIGSTOPped for longer than JOB_TIMEOUT mid-load, then resumed: no traceback in its log,
    and every row finishes exactly once."""
    load = await prepare_load(outbox_env.service_url, 600, prefix="paused")
    cli = cli_env(outbox_env.env(job_timeout="1", max_attempts="20"))
    relay, worker = await services.start_fleet(cli)
    # Every 20th reservation is held by the test: jobs settling them are in flight (waiting on
    # the lock) when the worker is frozen, so their timeouts all expire at once when it resumes.
    held = [cid for cid, _ in load.rows[::20]]
    blocker = await asyncpg.connect(outbox_env.service_url)
    conn = await asyncpg.connect(outbox_env.service_url)
    producer = asyncio.create_task(produce(outbox_env.service_url, load.rows, pause=0.02))
    try:
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute(
            "SELECT 1 FROM ledger.reservations WHERE correlation_id = ANY($1::text[]) FOR UPDATE", held
        )
        await services.wait(at_least_finished(outbox_env.service_url, 100), message="100 rows finished")
        await services.wait(
            lambda: backends_waiting_on_locks(conn, worker), message="worker jobs waiting on a lock"
        )
        os.kill(worker.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(9.0)  # the freeze: longer than JOB_TIMEOUT + arq's 5 s margin
        os.kill(worker.proc.pid, signal.SIGCONT)
        await producer
        await lock.rollback()
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        await blocker.close()
        await conn.close()
    await services.wait(
        at_least_finished(outbox_env.service_url, len(load.rows)), timeout=90, message="every row finished"
    )
    assert_running(relay, worker)
    assert_plain_log(worker)
    await assert_settled(outbox_env.service_url, load)
