"""Batch jobs (issue 8): one transaction for the fast path of a batch, failures per row, markers."""

from __future__ import annotations

from collections import Counter
from typing import Any

from outbox_relay.arq_adapter.producer import MARKER_PREFIX
from outbox_relay.composition import worker_config
from outbox_relay.db import Connection, create_pool
from outbox_relay.events import OutboxEvent
from outbox_relay.handlers import HandlerRegistry, registry
from outbox_relay.queue import Job
from outbox_relay.worker import RowProcessor
from tests.conftest import OutboxEnv
from tests.helpers import (
    count_status,
    equals,
    money_total,
    open_account,
    queue_of,
    reserve,
    running_relay,
    running_worker,
    wait_until,
)


async def _insert(conn: Any, cid: str, outcome: str | None, *, kind: str = "reservation") -> int:
    return int(
        await conn.fetchval(
            "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome)"
            " VALUES ($1, $2, $3) RETURNING id",
            cid,
            kind,
            outcome,
        )
    )


def _with_flaky(calls: Counter[str], fail_times: int) -> HandlerRegistry:
    """The shipped handlers plus a ``flaky`` kind that fails transiently ``fail_times`` times."""
    handlers = HandlerRegistry()
    for plugin in registry.plugins():
        handlers.add_plugin(plugin)

    @handlers.register("flaky")
    async def flaky(conn: Connection, event: OutboxEvent) -> None:
        calls[event.correlation_id] += 1
        if calls[event.correlation_id] <= fail_times:
            raise ConnectionError("not yet")

    return handlers


async def test_a_batch_commits_its_fast_path_once_and_keeps_failures_per_row(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """The well-formed rows of a batch finish in ONE transaction (one finished_at); a poison row fails
    alone, a transient one asks for its own retry; delivered again, the batch changes nothing."""
    await open_account(service, "acc", 10_000)
    good = [f"b-{i}" for i in range(8)]
    for cid in good:
        await reserve(service, "acc", 100, cid)
    total = await money_total(service)
    ids = [await _insert(service, cid, "success" if i % 2 else "failure") for i, cid in enumerate(good)]
    poison = await _insert(service, "b-poison", "success")  # no reservation: permanent
    flaky = await _insert(service, "b-flaky", "success", kind="flaky")
    calls: Counter[str] = Counter()
    pool = await create_pool(outbox_env.service_url, max_size=4)
    try:
        processor = RowProcessor(worker_config(outbox_env.settings()), pool, _with_flaky(calls, 1))
        jobs = [Job(row_id) for row_id in [flaky, *ids, poison]]
        outcomes = await processor(jobs)
        results = [o.result for o in outcomes]
        assert results == ["retried", *["finished"] * len(ids), "failed"]
        assert outcomes[0].retry_in is not None
        assert outcomes[0].counted
        finished_at = await service.fetch(
            "SELECT DISTINCT finished_at FROM outbox_relay.outbox WHERE id = ANY($1::bigint[])", ids
        )
        assert len(finished_at) == 1, "the fast path of the batch took more than one transaction"
        again = await processor([Job(row_id, 2) for row_id in [*ids, poison]])
        assert [o.result for o in again] == ["duplicate"] * (len(ids) + 1)
    finally:
        await pool.close()
    states = await service.fetch("SELECT state FROM ledger.reservations ORDER BY correlation_id")
    assert {r["state"] for r in states} == {"burned", "reclaimed"}
    assert await money_total(service) == total
    attempts = await service.fetch(
        "SELECT attempts FROM outbox_relay.outbox WHERE id = ANY($1::bigint[])", [*ids, poison]
    )
    assert {r["attempts"] for r in attempts} == {1}, "a finished row was applied again"


async def test_through_relay_and_worker_a_retry_reruns_only_its_row_and_leaves_no_marker(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """Rows committed together travel as one batch job; the transient row alone runs again (twice in
    all), the others once; when everything is done no dedupe marker stays in Redis."""
    settings = outbox_env.settings(sweep_interval=3600, max_attempts=5)
    await open_account(service, "acc", 10_000)
    good = [f"t-{i}" for i in range(10)]
    for cid in good:
        await reserve(service, "acc", 100, cid)
    total = await money_total(service)
    calls: Counter[str] = Counter()
    async with running_worker(settings, _with_flaky(calls, 1)), running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set(), message="relay active")
        async with service.transaction():
            for cid in good:
                await _insert(service, cid, "success")
            await _insert(service, "t-flaky", "success", kind="flaky")
        await wait_until(
            lambda: equals(count_status(service, "finished"), len(good) + 1),
            timeout=30,
            message="every row finished",
        )
        assert relay.stats.enqueued == len(good) + 1
    assert calls["t-flaky"] == 2
    rows = await service.fetch("SELECT correlation_id, attempts FROM outbox_relay.outbox")
    assert {r["correlation_id"]: r["attempts"] for r in rows} == {**dict.fromkeys(good, 1), "t-flaky": 2}
    assert await money_total(service) == total
    from outbox_relay.arq_adapter.producer import redis_client

    redis = redis_client(settings.redis_url.get_secret_value(), queue_name=queue_of(settings)[0])
    try:
        markers = [k async for k in redis.scan_iter(match=f"{MARKER_PREFIX}{queue_of(settings)[1]}:*")]
    finally:
        await redis.aclose(close_connection_pool=True)
    assert markers == [], "ended rows kept their dedupe markers"


async def test_concurrent_batches_refunding_the_same_accounts_each_commit_in_one_statement(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """Batches run at once whose refunds hit the same accounts in different orders never deadlock:
    every batch settles in its one fast-path transaction (no row falls back to the general path)."""
    import asyncio
    import random

    accounts = [f"acc-{i}" for i in range(6)]
    for account in accounts:
        await open_account(service, account, 1_000_000)
    rng = random.Random(8)
    batches: list[list[int]] = []
    for b in range(24):
        ids = []
        for j in range(12):
            cid = f"d-{b:02d}-{j:02d}"
            await reserve(service, rng.choice(accounts), 10, cid)
            ids.append(await _insert(service, cid, "failure"))
        batches.append(ids)
    total = await money_total(service)
    pool = await create_pool(outbox_env.service_url, max_size=8)
    try:
        processor = RowProcessor(worker_config(outbox_env.settings()), pool, registry)
        for start in range(0, len(batches), 8):
            rounds = batches[start : start + 8]
            results = await asyncio.gather(*(processor([Job(i) for i in ids]) for ids in rounds))
            assert all(o.result == "finished" for outcomes in results for o in outcomes)
    finally:
        await pool.close()
    for ids in batches:
        stamps = await service.fetch(
            "SELECT DISTINCT finished_at FROM outbox_relay.outbox WHERE id = ANY($1::bigint[])", ids
        )
        assert len(stamps) == 1, "a batch fell back to the general path (its fast path failed)"
    assert await money_total(service) == total
    assert await service.fetchval("SELECT count(*) FROM ledger.reservations WHERE state <> 'reclaimed'") == 0


async def test_jobs_a_worker_runs_at_once_commit_together_and_each_row_settles_once(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """40 one-row jobs run at once by one processor share fast-path commits (fewer finish times than
    jobs); each row finishes once, a second delivery in the same burst is a duplicate, money is kept."""
    import asyncio

    await open_account(service, "acc", 1_000_000)
    ids = []
    for i in range(40):
        await reserve(service, "acc", 10, f"g-{i:02d}")
        ids.append(await _insert(service, f"g-{i:02d}", "success" if i % 3 else "failure"))
    total = await money_total(service)
    pool = await create_pool(outbox_env.service_url, max_size=4)
    try:
        processor = RowProcessor(worker_config(outbox_env.settings()), pool, registry)
        jobs = [[Job(i)] for i in ids] + [[Job(ids[0], 2)]]
        results = await asyncio.gather(*(processor(job) for job in jobs))
    finally:
        await pool.close()
    outcomes = Counter(o.result for outcomes in results for o in outcomes)
    assert outcomes == Counter({"finished": 40, "duplicate": 1})
    stamps = await service.fetchval(
        "SELECT count(DISTINCT finished_at) FROM outbox_relay.outbox WHERE id = ANY($1::bigint[])", ids
    )
    assert stamps < len(ids), "every job committed on its own"
    assert await money_total(service) == total
    assert (
        await service.fetchval(
            "SELECT count(*) FROM outbox_relay.outbox WHERE id = ANY($1::bigint[]) AND attempts <> 1", ids
        )
        == 0
    )


async def test_a_one_row_job_of_0_1_0_runs_as_a_batch_of_one(outbox_env: OutboxEnv, service: Any) -> None:
    """A 0.1.0 one-row job (``outbox_relay.process_row``) goes through the batch door: its transient
    failure is retried as a batch job, the row finishes on its second attempt, no marker stays."""
    from bench.noop_worker import enqueue_raw_jobs
    from outbox_relay.arq_adapter.producer import redis_client

    settings = outbox_env.settings(max_attempts=5)
    calls: Counter[str] = Counter()
    row_id = await _insert(service, "legacy-1", None, kind="flaky")
    url = settings.redis_url.get_secret_value()
    redis = redis_client(url, queue_name=queue_of(settings)[0])
    async with running_worker(settings, _with_flaky(calls, 1)):
        try:
            await enqueue_raw_jobs(redis, queue_of(settings)[0], queue_of(settings)[1], row_id, 1)
        finally:
            await redis.aclose(close_connection_pool=True)
        await wait_until(
            lambda: equals(count_status(service, "finished"), 1), timeout=30, message="the row finished"
        )
    assert calls["legacy-1"] == 2
    assert await service.fetchval("SELECT attempts FROM outbox_relay.outbox WHERE id = $1", row_id) == 2
    redis = redis_client(url, queue_name=queue_of(settings)[0])
    try:
        markers = [k async for k in redis.scan_iter(match=f"{MARKER_PREFIX}{queue_of(settings)[1]}:*")]
    finally:
        await redis.aclose(close_connection_pool=True)
    assert markers == [], "the retried row kept its dedupe marker"
