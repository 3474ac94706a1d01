"""The active relay prunes finished rows itself when RETENTION is set."""

from __future__ import annotations

from typing import Any

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
