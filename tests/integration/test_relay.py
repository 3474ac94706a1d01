"""The relay: reconnecting listener, one active relay per database, shared Redis, requeue, deduplication."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import Job

from outbox_relay.admin import requeue
from outbox_relay.arq_adapter import ArqQueue, QueueConfig, job_id
from outbox_relay.arq_adapter.consumer import deserialize_job
from outbox_relay.arq_adapter.producer import BATCH_FUNCTION_NAME, MARKER_PREFIX, marker_key, wake_key
from outbox_relay.exceptions import QueueError, QueueUnavailable
from outbox_relay.queue import HandOver
from outbox_relay.relay import Relay
from outbox_relay.relay.store import PendingRow
from tests.conftest import OutboxEnv, create_outbox_env, drop_outbox_env
from tests.helpers import (
    count_status,
    equals,
    open_account,
    produce,
    queue_of,
    reserve,
    running_relay,
    running_worker,
    wait_until,
)
from tests.servers import PgServer, RedisServer


async def test_listener_reconnects_after_its_backend_is_terminated_and_the_fast_path_works_again(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """After its listener backend is terminated the relay starts a new session and NOTIFY works again."""
    settings = outbox_env.settings(sweep_interval=3600)
    await open_account(service, "acc", 1_000)
    await reserve(service, "acc", 10, "before")
    await reserve(service, "acc", 10, "after")
    async with running_worker(settings), running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set() and relay.stats.sweeps == 1, message="swept")
        await produce(service, "before", "success")
        await wait_until(lambda: equals(count_status(service, "finished"), 1), message="first row finished")
        assert relay.stats.sessions == 1

        terminated = await service.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'outbox_relay.listener' AND datname = current_database()"
        )
        assert terminated == 1
        # The new session sweeps once at its start; after that only NOTIFY can hand a row over.
        await wait_until(
            lambda: relay.stats.sessions == 2 and relay.active.is_set() and relay.stats.sweeps == 2,
            timeout=20,
            message="second session active and swept",
        )
        notifications = relay.stats.notifications
        started = time.monotonic()
        await produce(service, "after", "success")
        await wait_until(
            lambda: equals(count_status(service, "finished"), 2), timeout=10, message="second row finished"
        )
        assert time.monotonic() - started < 5
        assert relay.stats.sweeps == 2, "the sweep handed the row over: the fast path did not come back"
        assert relay.stats.notifications > notifications, "no notification after the reconnect"


@pytest.mark.parametrize("other_queue", [False, True], ids=["same-queue", "different-queues"])
async def test_only_one_relay_is_active_per_database_and_a_standby_takes_over(
    outbox_env: OutboxEnv, service: Any, other_queue: bool
) -> None:
    """Of two relays on one database only one is active; stopping it lets the other take over in seconds."""
    first_settings = outbox_env.settings(sweep_interval=3600)
    second_settings = (
        outbox_env.settings(sweep_interval=3600, queue_name=f"{outbox_env.queue_name}_b")
        if other_queue
        else first_settings
    )
    await open_account(service, "acc", 1_000)
    await reserve(service, "acc", 10, "while-first")
    await reserve(service, "acc", 10, "after-takeover")
    overlaps: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running_worker(first_settings))
        if other_queue:
            await stack.enter_async_context(running_worker(second_settings))
        first_stack = contextlib.AsyncExitStack()
        stack.push_async_callback(first_stack.aclose)
        first = await first_stack.enter_async_context(running_relay(first_settings))
        await wait_until(lambda: first.active.is_set(), message="first relay active")
        second = await stack.enter_async_context(running_relay(second_settings))
        monitor = asyncio.create_task(_record_overlaps([first, second], overlaps))
        stack.callback(monitor.cancel)

        # The standby is up: its listener connection is open next to the active one's.
        await wait_until(
            lambda: _standby_tried(service, outbox_env.service_db), timeout=10, message="standby waiting"
        )
        await produce(service, "while-first", "success")
        await wait_until(lambda: equals(count_status(service, "finished"), 1), message="row via first")
        assert first.active.is_set()
        assert not second.active.is_set(), "the standby became active while the first relay runs"
        assert second.stats.sessions == 0
        assert second.stats.handed_over == 0

        stopped = time.monotonic()
        await first_stack.aclose()
        await wait_until(lambda: second.active.is_set(), timeout=10, message="standby took over")
        assert time.monotonic() - stopped < 5, "the standby took more than a few seconds to take over"
        await produce(service, "after-takeover", "success")
        await wait_until(lambda: equals(count_status(service, "finished"), 2), message="row via second")
        # The counter moves after the hand-over, which a fast worker can overtake: poll it.
        await wait_until(lambda: second.stats.handed_over >= 1, message="second relay handed over")
    assert overlaps == [], "two relays were active at the same time"


async def test_when_the_active_relay_loses_its_session_exactly_one_relay_is_active_again(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """Terminating the lock holder's session hands the work to exactly one relay, never two at once."""
    settings = outbox_env.settings(sweep_interval=3600)
    await open_account(service, "acc", 1_000)
    await reserve(service, "acc", 10, "after-loss")
    overlaps: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running_worker(settings))
        first = await stack.enter_async_context(running_relay(settings))
        await wait_until(lambda: first.active.is_set(), message="first relay active")
        second = await stack.enter_async_context(running_relay(settings))
        relays = [first, second]
        monitor = asyncio.create_task(_record_overlaps(relays, overlaps))
        stack.callback(monitor.cancel)
        await wait_until(
            lambda: _standby_tried(service, outbox_env.service_db), timeout=10, message="standby waiting"
        )

        terminated = await service.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = hashtext('outbox_relay')::oid AND objid = 1 AND objsubid = 2"
        )
        assert terminated == 1, "no session held the relay lock"
        await wait_until(
            lambda: sum(r.stats.sessions for r in relays) == 2 and any(r.active.is_set() for r in relays),
            timeout=15,
            message="a relay active again in a new session",
        )
        await produce(service, "after-loss", "success")
        await wait_until(lambda: equals(count_status(service, "finished"), 1), message="row finished")
        assert sum(r.active.is_set() for r in relays) == 1
    assert overlaps == [], "two relays were active at the same time"


async def test_two_services_sharing_one_redis_with_the_same_correlation_ids_do_not_interfere(
    outbox_env: OutboxEnv, service: Any, pg_server: PgServer, redis_server: RedisServer
) -> None:
    """Two services on one Redis with the same correlation ids never dedupe or block each other's jobs."""
    other = await create_outbox_env(pg_server, redis_server.url())
    try:
        other_service = await asyncpg.connect(other.service_url)
        try:
            cids = [f"shared-{i}" for i in range(20)]
            first_settings = outbox_env.settings(sweep_interval=3600)
            second_settings = other.settings(sweep_interval=3600)
            for conn in (service, other_service):
                await open_account(conn, "acc", 1_000)
                for cid in cids:
                    await reserve(conn, "acc", 10, cid)

            # The first service's jobs wait in Redis (no worker yet) while the second runs.
            async with running_relay(first_settings) as first:
                for cid in cids:
                    await produce(service, cid, "success")
                await wait_until(
                    lambda: equals(count_status(service, "queued"), len(cids)), message="first rows queued"
                )
                await wait_until(
                    lambda: first.stats.enqueued == len(cids), message="first service's jobs in Redis"
                )
                async with running_worker(second_settings), running_relay(second_settings):
                    for cid in cids:
                        await produce(other_service, cid, "failure")
                    await wait_until(
                        lambda: equals(count_status(other_service, "finished"), len(cids)),
                        timeout=20,
                        message="second service finished while the first one's jobs wait",
                    )
                assert await count_status(service, "queued") == len(cids)
                async with running_worker(first_settings):
                    await wait_until(
                        lambda: equals(count_status(service, "finished"), len(cids)),
                        timeout=20,
                        message="first service finished",
                    )
            first_states = {r["state"] for r in await service.fetch("SELECT state FROM ledger.reservations")}
            second_states = {
                r["state"] for r in await other_service.fetch("SELECT state FROM ledger.reservations")
            }
            assert first_states == {"burned"}
            assert second_states == {"reclaimed"}
        finally:
            await other_service.close()
    finally:
        await drop_outbox_env(other)


async def test_requeue_works_at_once_whatever_redis_kept_of_earlier_attempts(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """A requeued failed row is processed again at once (NOTIFY wake-up), despite junk keys of its old job."""
    settings = outbox_env.settings(sweep_interval=3600)
    await open_account(service, "acc", 1_000)
    queue = ArqQueue(QueueConfig(settings.redis_url.get_secret_value(), queue_of(settings)[0], "unused"))
    redis = queue.redis
    old_id = job_id(queue_of(settings)[1], "late")  # generation 0: the id of its earlier attempts
    next_marker = marker_key(queue_of(settings)[1], "late", 1)
    try:
        async with running_worker(settings), running_relay(settings) as relay:
            await wait_until(lambda: relay.active.is_set() and relay.stats.sweeps == 1, message="swept")
            await produce(service, "late", "success")  # its reservation is not there yet: fails
            await wait_until(lambda: equals(count_status(service, "failed"), 1), message="row failed")
            row = await service.fetchrow("SELECT * FROM outbox_relay.outbox WHERE correlation_id = 'late'")
            assert "no reservation" in row["last_error"]
            assert row["generation"] == 0
            await redis.set(job_key_prefix + old_id, b"junk")
            await redis.set(result_key_prefix + old_id, b"junk")
            await redis.set(next_marker, b"junk")  # names no job: orphaned, replaced

            await reserve(service, "acc", 100, "late")
            started = time.monotonic()
            result = await requeue(service, correlation_ids=["late"])
            assert (result.requeued, result.not_failed) == (1, [])
            await wait_until(
                lambda: equals(count_status(service, "finished"), 1), timeout=10, message="requeued row done"
            )
            assert time.monotonic() - started < 5
            assert relay.stats.sweeps >= 2, "the relay was not woken by requeue"
        row = await service.fetchrow("SELECT * FROM outbox_relay.outbox WHERE correlation_id = 'late'")
        assert (row["attempts"], row["last_error"]) == (1, None)
        state = await service.fetchval("SELECT state FROM ledger.reservations WHERE correlation_id = 'late'")
        assert state == "burned"
    finally:
        await redis.delete(job_key_prefix + old_id, result_key_prefix + old_id, next_marker)
        await queue.close()


async def test_job_queue_adds_each_row_once_in_batches_and_gives_requeued_rows_new_markers(
    outbox_env: OutboxEnv,
) -> None:
    """ArqQueue.hand_over packs rows into batch jobs, adds a row once while its job waits, a
    requeued row (next generation) is scheduled anew, and it counts the due jobs no worker runs."""
    settings = outbox_env.settings()
    queue_name, namespace = queue_of(settings)
    async with _job_queue(settings.redis_url.get_secret_value(), queue_name, namespace, 2) as (queue, redis):
        rows = [PendingRow(i, f"cid-{i}") for i in range(1, 6)]
        assert await queue.hand_over(rows) == HandOver(5, 3, 0), "5 rows in batches of 2 are 3 jobs"
        assert await queue.hand_over(rows) == HandOver(0, 3, 3), "the same rows were enqueued twice"
        assert await queue.hand_over([*rows[:2], PendingRow(6, "cid-6")]) == HandOver(1, 4, 3)
        first_job = (await redis.get(marker_key(namespace, "cid-1"))).decode()
        await redis.set(in_progress_key_prefix + first_job, b"1")  # a worker runs it
        assert await queue.hand_over([PendingRow(1, "cid-1", 1)]) == HandOver(1, 5, 3)
        assert await queue.depth() == 5

        holder = (await redis.get(marker_key(namespace, "cid-3"))).decode()
        info = await Job(holder, redis, _queue_name=queue_name, _deserializer=deserialize_job).info()
        assert info is not None
        assert info.function == BATCH_FUNCTION_NAME
        [batch] = info.args
        assert [row[0] for row in batch] == [3, 4]
        assert await redis.llen(wake_key(queue_name)) == 5, "one wake-up per job added"


async def test_a_refused_hand_over_writes_nothing_and_says_what_redis_said(outbox_env: OutboxEnv) -> None:
    """Issue 7.3: a WRONGTYPE queue key refuses the whole hand-over (QueueError naming it), leaves
    no marker behind, and the rows are scheduled once the key is fixed."""
    settings = outbox_env.settings()
    queue_name, namespace = queue_of(settings)
    async with _job_queue(settings.redis_url.get_secret_value(), queue_name, namespace) as (queue, redis):
        await redis.set(queue_name, b"not a sorted set")
        rows = [PendingRow(i, f"cid-{i}") for i in range(1, 4)]
        with pytest.raises(QueueError, match="Redis refused: WRONGTYPE") as refused:
            await queue.hand_over(rows)
        assert not isinstance(refused.value, QueueUnavailable)
        assert [key async for key in redis.scan_iter(match=f"{MARKER_PREFIX}{namespace}:*")] == []
        await redis.delete(queue_name)
        assert await queue.hand_over(rows) == HandOver(3, 1, 0)


async def test_a_marker_naming_no_waiting_or_running_job_is_orphaned_and_replaced(
    outbox_env: OutboxEnv,
) -> None:
    """Issue 7.3: a marker whose job is gone, holds junk, or is a key of another type does not
    block its row: the next hand-over schedules the row; a marker of a running job does."""
    settings = outbox_env.settings()
    queue_name, namespace = queue_of(settings)
    async with _job_queue(settings.redis_url.get_secret_value(), queue_name, namespace) as (queue, redis):
        await redis.set(marker_key(namespace, "lost"), b"a-job-nobody-has")
        await redis.hset(marker_key(namespace, "hash"), "x", "y")
        await redis.set(marker_key(namespace, "running"), b"busy-job")
        await redis.set(in_progress_key_prefix + "busy-job", b"1")
        rows = [PendingRow(1, "lost"), PendingRow(2, "hash"), PendingRow(3, "running")]
        assert await queue.hand_over(rows) == HandOver(2, 1, 0)
        holder = (await redis.get(marker_key(namespace, "hash"))).decode()
        assert await redis.zscore(queue_name, holder) is not None
        assert (await redis.get(marker_key(namespace, "running"))) == b"busy-job"
        await redis.delete(in_progress_key_prefix + "busy-job")


@contextlib.asynccontextmanager
async def _job_queue(
    url: str, queue_name: str, namespace: str, batch_size: int = 50
) -> AsyncIterator[tuple[ArqQueue, Any]]:
    queue = ArqQueue(QueueConfig(url, queue_name, namespace, batch_size=batch_size))
    redis = queue.redis
    try:
        yield queue, redis
    finally:
        keys = [key async for key in redis.scan_iter(match=f"*{namespace}:*")]
        await redis.delete(queue_name, wake_key(queue_name), *keys)
        await queue.close()


async def _record_overlaps(relays: list[Relay], overlaps: list[float]) -> None:
    """Sample the relays' active flags (every 10 ms) and note each moment two were active."""
    while True:
        if sum(relay.active.is_set() for relay in relays) > 1:
            overlaps.append(time.monotonic())
        await asyncio.sleep(0.01)


async def _standby_tried(conn: Any, database: str) -> bool:
    """True once two listener connections are open on ``database`` (the active one and a standby)."""
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox_relay.listener'"
        " AND datname = $1",
        database,
    )
    return bool(count == 2)
