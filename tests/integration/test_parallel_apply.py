"""PostgreSQL 16+ `streaming = parallel` (18's default): a large transaction applied by a parallel
apply worker still fires the notify trigger, so the relay's fast path sees its rows."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from outbox_relay.composition import replication_config
from outbox_relay.db import quote_ident
from outbox_relay.devtools.embedded import EmbeddedPostgres
from outbox_relay.replication import subscribe
from tests.conftest import OutboxEnv
from tests.helpers import count_status, running_relay, wait_until
from tests.servers import PgServer

#: Rows of the large transaction: about 1 MB of changes, far past logical_decoding_work_mem = 64kB.
ROWS = 3000


@pytest.fixture(scope="module")
def pg_server(pg_server: PgServer) -> Iterator[PgServer]:
    """The shared server when it is PostgreSQL 16 or later; else (a container of 15, say) an
    embedded PostgreSQL 18 of this module's own, so that the test runs wherever the suite does."""

    async def version() -> int:
        conn = await asyncpg.connect(pg_server.url())
        try:
            return int(await conn.fetchval("SHOW server_version_num"))
        finally:
            await conn.close()

    if asyncio.run(version()) >= 160000:
        yield pg_server
        return
    own = EmbeddedPostgres()
    own.start()
    try:
        yield own
    finally:
        own.cleanup()


async def test_notify_trigger_fires_for_a_large_transaction_applied_in_parallel(
    outbox_env: OutboxEnv, service: Any, primary: Any
) -> None:
    """A 3000-row transaction streamed (64kB decoding memory) to a `streaming = parallel` subscription is
    applied by a parallel apply worker and handed over through NOTIFY alone (the sweep an hour away)."""
    assert int(await service.fetchval("SHOW server_version_num")) >= 160000, "parallel apply needs 16+"
    # The walsender decoding for this subscription reads the primary database's settings.
    await primary.execute(
        f"ALTER DATABASE {quote_ident(outbox_env.primary_db)} SET logical_decoding_work_mem = '64kB'"
    )
    settings = outbox_env.settings(sweep_interval=3600)
    await subscribe(replication_config(settings))
    name = outbox_env.subscription_name
    await service.execute(f"ALTER SUBSCRIPTION {quote_ident(name)} SET (streaming = parallel)")
    mode = await service.fetchval("SELECT substream::text FROM pg_subscription WHERE subname = $1", name)
    assert mode == "p"

    async with running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set(), message="relay active")
        await wait_until(lambda: relay.stats.sweeps >= 1, message="initial sweep")
        sweeps, notifications = relay.stats.sweeps, relay.stats.notifications
        streamed_before = await _streamed(primary, name)
        async with primary.transaction():
            await primary.execute(
                "INSERT INTO outbox_relay.outbox (correlation_id, outcome, payload)"
                " SELECT 'big-' || i, 'success', jsonb_build_object('pad', repeat('x', 200))"
                "   FROM generate_series(1, $1) AS i",
                ROWS,
            )
        await wait_until(
            lambda: _at_least(count_status(service, "queued", "finished"), ROWS),
            timeout=60,
            message=f"the {ROWS} rows handed over",
        )
        assert relay.stats.sweeps == sweeps, "the sweep ran: NOTIFY did not deliver the rows"
        assert relay.stats.notifications - notifications == ROWS, "a row of the transaction was not notified"

    # Proof that the transaction took the path under test: streamed by the primary before its
    # commit, and applied by a parallel apply worker (kept in the subscription's pool afterwards).
    await wait_until(
        lambda: _greater(_streamed(primary, name), streamed_before), message="the transaction streamed"
    )
    await wait_until(lambda: _parallel_workers(service, name), timeout=10, message="a parallel apply worker")


async def _streamed(primary: Any, slot: str) -> int:
    """Transactions the slot has streamed (pg_stat_replication_slots)."""
    value = await primary.fetchval(
        "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1", slot
    )
    return int(value or 0)


async def _parallel_workers(service: Any, name: str) -> int:
    """Parallel apply workers of the subscription (rows of pg_stat_subscription with a leader)."""
    return int(
        await service.fetchval(
            "SELECT count(*) FROM pg_stat_subscription WHERE subname = $1 AND leader_pid IS NOT NULL", name
        )
    )


async def _at_least(value: Any, expected: int) -> bool:
    return int(await value) >= expected


async def _greater(value: Any, than: int) -> bool:
    return int(await value) > than
