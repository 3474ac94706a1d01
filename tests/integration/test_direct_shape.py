"""The direct shape: the producer writes straight into the service database, no replication."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests.conftest import OutboxEnv
from tests.helpers import (
    count_status,
    equals,
    money_total,
    open_account,
    produce,
    reserve,
    running_relay,
    running_worker,
    wait_until,
)


async def test_rows_inserted_into_the_service_database_finish_through_notify(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """Rows a producer inserts into the service outbox (id omitted) finish by the NOTIFY path, no sweep."""
    settings = outbox_env.settings(sweep_interval=3600)
    assert await service.fetchval("SELECT count(*) FROM pg_subscription") == 0
    await open_account(service, "acc", 1_000)
    outcomes = {f"direct-{i}": ("success" if i % 2 else "failure") for i in range(6)}
    for cid in outcomes:
        await reserve(service, "acc", 100, cid)
    total = await money_total(service)

    async with running_worker(settings), running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set() and relay.stats.sweeps >= 1, message="swept")
        sweeps_before = relay.stats.sweeps
        for cid, outcome in outcomes.items():
            await produce(service, cid, outcome)  # the producer omits id: the identity default fills it
        await wait_until(
            lambda: equals(count_status(service, "finished"), len(outcomes)),
            timeout=10,
            message="every row finished",
        )
        assert relay.stats.sweeps == sweeps_before, "the sweep ran: the fast path was not used"
        assert relay.stats.notifications >= len(outcomes)

    ids = [r["id"] for r in await service.fetch("SELECT id FROM outbox_relay.outbox ORDER BY id")]
    assert len(set(ids)) == len(outcomes)
    assert all(i > 0 for i in ids)
    states = dict(await service.fetch("SELECT correlation_id, state FROM ledger.reservations"))
    assert states == {cid: ("burned" if o == "success" else "reclaimed") for cid, o in outcomes.items()}
    assert await service.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'") == 1_000 - 300
    assert await money_total(service) == total


async def test_direct_insert_with_a_duplicate_correlation_id_is_refused(service: Any) -> None:
    """A producer inserting a correlation id the outbox already holds gets a unique violation."""
    await produce(service, "twice", "success")
    with pytest.raises(asyncpg.UniqueViolationError):
        await produce(service, "twice", "failure")
    rows = await service.fetch("SELECT outcome FROM outbox_relay.outbox WHERE correlation_id = 'twice'")
    assert [r["outcome"] for r in rows] == ["success"]
