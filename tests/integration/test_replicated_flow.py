"""The replicated shape end to end: primary → logical replication → NOTIFY → arq → effect."""

from __future__ import annotations

import asyncio
from typing import Any

from outbox_relay.composition import replication_config
from outbox_relay.replication import subscribe, unsubscribe
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


async def test_row_committed_on_primary_finishes_through_notify_without_the_sweep(
    outbox_env: OutboxEnv, service: Any, primary: Any
) -> None:
    """A row committed on the primary is finished on the replica through NOTIFY, the sweep an hour away."""
    settings = outbox_env.settings(sweep_interval=3600)
    await subscribe(replication_config(settings))
    await open_account(service, "acc", 1_000)
    await reserve(service, "acc", 100, "job-1")
    await reserve(service, "acc", 50, "job-2")
    total = await money_total(service)
    async with running_worker(settings), running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set(), message="relay active")
        await wait_until(lambda: _swept(relay), message="initial sweep")
        sweeps_before = relay.stats.sweeps
        await produce(primary, "job-1", "success")
        await produce(primary, "job-2", "failure")
        await wait_until(
            lambda: equals(count_status(service, "finished"), 2), timeout=10, message="both finished"
        )
        assert relay.stats.sweeps == sweeps_before, "the sweep ran: the fast path was not used"
    states = dict(await service.fetch("SELECT correlation_id, state FROM ledger.reservations"))
    assert states == {"job-1": "burned", "job-2": "reclaimed"}
    assert await service.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'") == 900
    assert await money_total(service) == total


async def test_sweep_alone_finishes_replicated_rows_when_the_notify_trigger_is_disabled(
    outbox_env: OutboxEnv, service: Any, primary: Any
) -> None:
    """With the notify trigger disabled, the periodic sweep alone finishes replicated rows."""
    await service.execute("ALTER TABLE outbox_relay.outbox DISABLE TRIGGER outbox_notify")
    settings = outbox_env.settings(sweep_interval=0.3)
    await subscribe(replication_config(settings))
    await open_account(service, "acc", 1_000)
    await reserve(service, "acc", 100, "sw-1")
    await reserve(service, "acc", 40, "sw-2")
    total = await money_total(service)
    async with running_worker(settings), running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set(), message="relay active")
        await produce(primary, "sw-1", "success")
        await produce(primary, "sw-2", "failure")
        await wait_until(
            lambda: equals(count_status(service, "finished"), 2), timeout=20, message="both finished"
        )
        assert relay.stats.notifications == 0, "a notification arrived although the trigger is disabled"
        # The counter moves after the hand-over, which a fast worker can overtake: poll it.
        await wait_until(lambda: relay.stats.swept >= 2, message="rows counted as swept")
    states = dict(await service.fetch("SELECT correlation_id, state FROM ledger.reservations"))
    assert states == {"sw-1": "burned", "sw-2": "reclaimed"}
    assert await money_total(service) == total


async def test_subscribe_copies_existing_rows_leaves_a_slot_and_is_safe_to_run_again(
    outbox_env: OutboxEnv, service: Any, primary: Any
) -> None:
    """subscribe copies rows already on the primary, leaves its slot there on return, and can run again."""
    settings = outbox_env.settings(sweep_interval=3600)
    name = outbox_env.subscription_name
    await open_account(service, "acc", 1_000)
    cids = [f"pre-{i}" for i in range(5)]
    for cid in cids:
        await reserve(service, "acc", 10, cid)
        await produce(primary, cid, "failure")
    total = await money_total(service)

    first = await subscribe(replication_config(settings), wait=False)
    assert first.created
    assert await _slot_exists(primary, name), "no replication slot on the primary after subscribe"
    second = await subscribe(replication_config(settings))
    assert not second.created, "a second subscribe created another subscription"
    assert second.synced
    assert await _slot_exists(primary, name)
    assert await service.fetchval("SELECT count(*) FROM pg_subscription WHERE subname = $1", name) == 1

    await wait_until(
        lambda: equals(_row_count(service), len(cids)), timeout=30, message="pre-existing rows copied"
    )
    async with running_worker(settings), running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set(), message="relay active")
        await wait_until(
            lambda: equals(count_status(service, "finished"), len(cids)),
            timeout=20,
            message="copied rows finished",
        )
    assert await _row_count(service) == len(cids)
    assert await service.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'") == 1_000
    assert await money_total(service) == total


async def test_concurrent_subscribes_both_succeed_with_one_subscription_and_one_slot(
    outbox_env: OutboxEnv, service: Any, primary: Any
) -> None:
    """Two subscribe runs started at once (two relay instances) both succeed and make one subscription."""
    settings = outbox_env.settings()
    name = outbox_env.subscription_name
    await produce(primary, "conc-1", "success")

    config = replication_config(settings)
    results = await asyncio.gather(subscribe(config), subscribe(config))

    assert sorted(r.created for r in results) == [False, True]
    assert all(r.synced for r in results)
    assert await primary.fetchval("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", name) == 1
    assert await service.fetchval("SELECT count(*) FROM pg_subscription WHERE subname = $1", name) == 1
    await wait_until(lambda: equals(_row_count(service), 1), timeout=30, message="row copied once")
    await produce(primary, "conc-2", "success")
    await wait_until(lambda: equals(_row_count(service), 2), timeout=30, message="replication running")


async def test_resubscription_brings_over_only_the_missing_rows_and_never_stalls(
    outbox_env: OutboxEnv, service: Any, primary: Any
) -> None:
    """Re-subscribing brings over exactly the missing rows, and replication keeps going afterwards."""
    settings = outbox_env.settings(sweep_interval=3600)
    await open_account(service, "acc", 10_000)
    for i in range(10):
        await reserve(service, "acc", 10, f"r-{i}")
    total = await money_total(service)

    async with running_worker(settings), running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set(), message="relay active")
        await subscribe(replication_config(settings))
        for i in range(4):
            await produce(primary, f"r-{i}", "failure")
        await wait_until(
            lambda: equals(count_status(service, "finished"), 4), timeout=20, message="first rows finished"
        )
        before = {
            r["correlation_id"]: (r["id"], r["attempts"], r["finished_at"])
            for r in await service.fetch("SELECT * FROM outbox_relay.outbox")
        }

        await unsubscribe(replication_config(settings))
        for i in range(4, 8):
            await produce(primary, f"r-{i}", "failure")
        # A stalled copy (a duplicate refused by the replica) never reaches 'ready': fail in time.
        await subscribe(replication_config(settings), sync_timeout=60)
        await wait_until(
            lambda: equals(count_status(service, "finished"), 8), timeout=30, message="missing rows finished"
        )
        await produce(primary, "r-8", "failure")
        await wait_until(
            lambda: equals(count_status(service, "finished"), 9),
            timeout=30,
            message="a row inserted after the re-subscription finished",
        )

    cids = [r["correlation_id"] for r in await service.fetch("SELECT * FROM outbox_relay.outbox")]
    assert sorted(cids) == sorted(f"r-{i}" for i in range(9)), "rows duplicated or lost"
    after = {
        r["correlation_id"]: (r["id"], r["attempts"], r["finished_at"])
        for r in await service.fetch("SELECT * FROM outbox_relay.outbox")
    }
    for cid, kept in before.items():
        assert after[cid] == kept, f"row {cid} was touched again by the re-subscription"
    states = dict(await service.fetch("SELECT correlation_id, state FROM ledger.reservations"))
    assert states == {**{f"r-{i}": "reclaimed" for i in range(9)}, "r-9": "reserved"}
    assert await service.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'") == 10_000 - 10
    assert await money_total(service) == total


async def test_unsubscribe_drops_subscription_and_slot_and_is_safe_to_run_again(
    outbox_env: OutboxEnv, service: Any, primary: Any
) -> None:
    """unsubscribe leaves neither the subscription nor its slot, and a second run succeeds doing nothing."""
    settings = outbox_env.settings()
    name = outbox_env.subscription_name
    await subscribe(replication_config(settings))
    assert await _slot_exists(primary, name)

    first = await unsubscribe(replication_config(settings))
    assert first.subscription_dropped
    assert first.slot_dropped
    assert not await _slot_exists(primary, name), "the slot was left behind on the primary"
    assert await service.fetchval("SELECT count(*) FROM pg_subscription WHERE subname = $1", name) == 0

    second = await unsubscribe(replication_config(settings))
    assert not second.subscription_dropped
    assert not second.slot_dropped
    assert not await _slot_exists(primary, name)


async def _swept(relay: Any) -> bool:
    return bool(relay.stats.sweeps >= 1 and relay.stats.sessions >= 1)


async def _slot_exists(primary: Any, name: str) -> bool:
    query = "SELECT count(*) > 0 FROM pg_replication_slots WHERE slot_name = $1"
    return bool(await primary.fetchval(query, name))


async def _row_count(conn: Any) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM outbox_relay.outbox"))
