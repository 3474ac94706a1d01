"""The active relay prunes finished rows itself when RETENTION is set."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import OutboxEnv
from tests.helpers import running_relay, wait_until


async def test_active_relay_prunes_old_finished_rows_every_prune_interval(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """With RETENTION and PRUNE_INTERVAL set, old finished rows disappear; pending and recent rows stay."""
    await service.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, outcome, status, finished_at)"
        " SELECT 'old-' || g, 'success', 'finished', now() - interval '2 hours'"
        " FROM generate_series(1, 50) AS g"
    )
    await service.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, outcome, status, finished_at)"
        " VALUES ('recent', 'success', 'finished', now())"
    )
    await service.execute("ALTER TABLE outbox_relay.outbox DISABLE TRIGGER outbox_notify")
    await service.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, outcome, status, queued_at)"
        " VALUES ('pending', 'success', 'queued', now())"
    )
    settings = outbox_env.settings(retention=3600, prune_interval=0.2, prune_batch_size=7)

    async def old_rows_left() -> int:
        return int(
            await service.fetchval(
                "SELECT count(*) FROM outbox_relay.outbox WHERE correlation_id LIKE 'old-%'"
            )
        )

    async with running_relay(settings) as relay:
        await wait_until(lambda: _is_zero(old_rows_left()), timeout=20, message="old rows pruned")
        assert relay.stats.pruned == 50
    left = {
        r["correlation_id"] for r in await service.fetch("SELECT correlation_id FROM outbox_relay.outbox")
    }
    assert left == {"recent", "pending"}


async def _is_zero(value: Any) -> bool:
    return int(await value) == 0


async def test_the_retention_loop_of_a_relay_that_lost_its_lease_deletes_nothing(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """The relay's prune is fenced: once another epoch holds the lease, the check before each DELETE
    raises LeadershipLostError and no row goes; under the current epoch the same prune deletes."""
    from outbox_relay.db import create_pool
    from outbox_relay.exceptions import LeadershipLostError
    from outbox_relay.prune import prune_service
    from outbox_relay.relay.store import RelayStore
    from outbox_relay.sql import query

    await service.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, outcome, status, finished_at)"
        " SELECT 'old-' || g, 'success', 'finished', now() - interval '2 hours'"
        " FROM generate_series(1, 20) AS g"
    )
    mine = await service.fetchval(query("take_lease"), "me", 30.0)
    theirs = await service.fetchval(query("take_lease"), "another relay", 30.0)
    assert theirs == mine + 1
    pool = await create_pool(outbox_env.service_url, max_size=2)
    try:
        stale = RelayStore(pool, batch_size=5, requeue_after=60, epoch=mine)
        with pytest.raises(LeadershipLostError):
            await prune_service(pool, older_than=3600, batch_size=100, fence=stale.check_leadership)
        assert await service.fetchval("SELECT count(*) FROM outbox_relay.outbox") == 20
        current = RelayStore(pool, batch_size=5, requeue_after=60, epoch=theirs)
        fence = current.check_leadership
        assert (await prune_service(pool, older_than=3600, batch_size=100, fence=fence)).deleted == 20
    finally:
        await pool.close()
