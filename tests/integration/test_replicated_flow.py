"""The replicated shape end to end: primary → logical replication → NOTIFY → arq → effect."""

from __future__ import annotations

from typing import Any

from outbox_relay.replication import subscribe
from tests.conftest import OutboxEnv
from tests.helpers import (
    count_status,
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
    """A row committed on the primary is finished on the replica by the NOTIFY path, with the sweep an hour away."""
    settings = outbox_env.settings(sweep_interval=3600)
    await subscribe(settings)
    await open_account(service, "acc", 1_000)
    await reserve(service, "acc", 100, "job-1")
    await reserve(service, "acc", 50, "job-2")
    total = await money_total(service)
    async with running_worker(settings), running_relay(settings) as relay:
        await wait_until(lambda: _active(relay), message="relay active")
        await wait_until(lambda: _swept(relay), message="initial sweep")
        sweeps_before = relay.stats.sweeps
        await produce(primary, "job-1", "success")
        await produce(primary, "job-2", "failure")
        await wait_until(
            lambda: _equals(count_status(service, "finished"), 2), timeout=10, message="both finished"
        )
        assert relay.stats.sweeps == sweeps_before, "the sweep ran: the fast path was not used"
    states = dict(await service.fetch("SELECT correlation_id, state FROM ledger.reservations"))
    assert states == {"job-1": "burned", "job-2": "reclaimed"}
    assert await service.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'") == 900
    assert await money_total(service) == total


async def _active(relay: Any) -> bool:
    return bool(relay.active.is_set())


async def _swept(relay: Any) -> bool:
    return bool(relay.stats.sweeps >= 1 and relay.stats.sessions >= 1)


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
