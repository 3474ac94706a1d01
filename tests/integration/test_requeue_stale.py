"""`requeue --correlation-id` of a row stuck in `queued` (contract section 3)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from arq.constants import job_key_prefix

from outbox_relay.arq_adapter import ArqQueue, QueueConfig
from outbox_relay.arq_adapter.producer import job_id
from tests.conftest import OutboxEnv
from tests.helpers import (
    cli_env,
    count_status,
    equals,
    open_account,
    queue_of,
    reserve,
    run_cli,
    running_relay,
    running_worker,
    wait_until,
)


async def test_requeue_takes_a_row_queued_longer_than_requeue_after_and_it_finishes_at_once(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """A row `queued` past REQUEUE_AFTER (its job id held by junk) is requeued under a new generation and
    finishes at once; one queued for less than REQUEUE_AFTER is refused and left alone."""
    # The relay would only hand the row over again after an hour: only `requeue` can unstick it.
    settings = outbox_env.settings(sweep_interval=3600, requeue_after=3600)
    await open_account(service, "acc", 1_000)
    await reserve(service, "acc", 100, "stuck")
    queue = ArqQueue(QueueConfig(settings.redis_url.get_secret_value(), queue_of(settings)[0], "unused"))
    old_key = job_key_prefix + job_id(queue_of(settings)[1], "stuck")
    try:
        # Something else holds the row's job id: a hand-over of generation 0 is deduplicated against it.
        await queue.redis.set(old_key, b"junk")
        async with running_worker(settings), running_relay(settings) as relay:
            await wait_until(lambda: relay.active.is_set() and relay.stats.sweeps >= 1, message="swept")
            # Written `queued` from the start, unnotified: no sweep (a reconnect makes one) can see it `new`.
            async with service.transaction():
                await service.execute("ALTER TABLE outbox_relay.outbox DISABLE TRIGGER outbox_notify")
                await service.execute(
                    "INSERT INTO outbox_relay.outbox (correlation_id, outcome, status, queued_at)"
                    " VALUES ('stuck', 'success', 'queued', now() - interval '120 seconds')"
                )
                await service.execute("ALTER TABLE outbox_relay.outbox ENABLE ALWAYS TRIGGER outbox_notify")

            requeue = ("requeue", "--correlation-id", "stuck")
            refused = await asyncio.to_thread(
                run_cli, *requeue, env=cli_env(outbox_env.env(requeue_after="3600"))
            )
            assert refused.returncode == 1, refused.stderr
            assert "stuck" in refused.stderr
            assert "Traceback" not in refused.stderr
            row = await service.fetchrow("SELECT status, generation FROM outbox_relay.outbox")
            assert (row["status"], row["generation"]) == ("queued", 0)

            started = time.monotonic()
            done = await asyncio.to_thread(run_cli, *requeue, env=cli_env(outbox_env.env(requeue_after="60")))
            assert done.returncode == 0, done.stderr
            assert "requeued 1 row" in done.stdout
            await wait_until(
                lambda: equals(count_status(service, "finished"), 1), timeout=10, message="the row finished"
            )
            assert time.monotonic() - started < 8, "the relay was not woken by requeue"
        row = await service.fetchrow("SELECT status, generation, attempts FROM outbox_relay.outbox")
        assert (row["status"], row["generation"], row["attempts"]) == ("finished", 1, 1)
        state = await service.fetchval("SELECT state FROM ledger.reservations WHERE correlation_id = 'stuck'")
        assert state == "burned"
        assert await queue.redis.get(old_key) == b"junk", "the test's junk key was not what blocked the row"
    finally:
        await queue.redis.delete(old_key)
        await queue.close()
