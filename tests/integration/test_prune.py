"""Retention: `prune` on the service database (finished rows, in small PK-range batches) and on
the primary (only rows every logical replication slot has confirmed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from outbox_relay.composition import replication_config
from outbox_relay.db import create_pool, quote_ident
from outbox_relay.exceptions import NoSubscriberError, SubscriberLagError
from outbox_relay.prune import (
    prune_primary,
    prune_service,
)
from outbox_relay.replication import subscribe
from outbox_relay.sql import query
from tests.conftest import OutboxEnv
from tests.helpers import (
    cli_env,
    count_status,
    money_total,
    open_account,
    produce,
    reserve,
    run_cli,
    running_relay,
    running_worker,
    wait_until,
)

HOUR = 3600.0

# A service-database row as the relay leaves it; ages are in hours before now().
_INSERT_SERVICE_ROWS = """
INSERT INTO outbox_relay.outbox (id, correlation_id, outcome, status, attempts, created_at, finished_at)
SELECT id, $2 || id, 'success', $3, 1,
       now() - make_interval(hours => $4),
       CASE WHEN $3 IN ('finished', 'failed') THEN now() - make_interval(hours => $5) END
  FROM unnest($1::bigint[]) AS id
"""


async def _rows(
    conn: Any, ids: list[int] | range, *, prefix: str, status: str = "finished", created: int, finished: int
) -> None:
    """Insert service rows with explicit ids, created ``created`` and finished ``finished`` hours ago."""
    await conn.execute(_INSERT_SERVICE_ROWS, list(ids), prefix, status, created, finished)


async def _cids(conn: Any) -> set[str]:
    return {r["correlation_id"] for r in await conn.fetch("SELECT correlation_id FROM outbox_relay.outbox")}


async def _old_primary_rows(conn: Any, prefix: str, n: int, *, hours: int = 2) -> None:
    """Insert ``n`` producer rows on the primary whose created_at is ``hours`` ago."""
    await conn.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, outcome, created_at)"
        " SELECT $1 || g, 'success', now() - make_interval(hours => $3)"
        "   FROM generate_series(1, $2) AS g",
        prefix,
        n,
        hours,
    )


# -- service database -------------------------------------------------------------------


async def test_prune_service_deletes_only_finished_rows_finished_before_the_cutoff(service: Any) -> None:
    """Finished rows finished before the cut-off go; newer finished, new, queued and failed rows stay."""
    await _rows(service, range(1, 11), prefix="old-done-", created=5, finished=4)
    await _rows(service, range(11, 16), prefix="recent-done-", created=5, finished=0)
    await _rows(service, range(16, 19), prefix="old-new-", status="new", created=5, finished=0)
    await _rows(service, range(19, 22), prefix="old-queued-", status="queued", created=5, finished=0)
    await _rows(service, range(22, 25), prefix="old-failed-", status="failed", created=5, finished=4)
    await _rows(service, range(25, 30), prefix="fresh-done-", created=0, finished=0)

    pruned = (await prune_service(service, older_than=HOUR, batch_size=100)).deleted

    assert pruned == 10
    left = await _cids(service)
    assert not {c for c in left if c.startswith("old-done-")}
    assert len(left) == 19
    assert {c.split("-")[0] + "-" + c.split("-")[1] for c in left} == {
        "recent-done",
        "old-new",
        "old-queued",
        "old-failed",
        "fresh-done",
    }
    assert (await prune_service(service, older_than=HOUR, batch_size=100)).deleted == 0, (
        "a second run found more"
    )


async def test_prune_service_include_failed_also_deletes_old_failed_rows(service: Any) -> None:
    """With include_failed, failed rows finished before the cut-off go too; recent failed rows stay."""
    await _rows(service, range(1, 6), prefix="old-failed-", status="failed", created=5, finished=4)
    await _rows(service, range(6, 9), prefix="recent-failed-", status="failed", created=5, finished=0)
    await _rows(service, range(9, 12), prefix="old-done-", created=5, finished=4)

    assert (await prune_service(service, older_than=HOUR, batch_size=100, include_failed=True)).deleted == 8
    assert await _cids(service) == {f"recent-failed-{i}" for i in range(6, 9)}


async def test_prune_service_works_in_batches_smaller_than_the_rows(service: Any) -> None:
    """batch_size=10 over 95 old finished rows deletes all 95, ten ids per statement."""
    await _rows(service, range(1, 96), prefix="old-", created=5, finished=4)
    await _rows(service, range(96, 111), prefix="fresh-", created=0, finished=0)

    stats = await prune_service(service, older_than=HOUR, batch_size=10)

    assert stats.deleted == 95
    assert stats.ranges >= 10, "fewer statements than 95 rows / 10 per batch"
    assert await _cids(service) == {f"fresh-{i}" for i in range(96, 111)}


async def test_prune_service_crosses_gaps_in_ids_without_walking_them(service: Any) -> None:
    """Rows in clusters billions of ids apart are all pruned, visiting only ranges that hold rows."""
    clusters = [range(1, 6), range(1_000_000, 1_000_004), range(5_000_000_000, 5_000_000_003)]
    for n, ids in enumerate(clusters):
        await _rows(service, ids, prefix=f"old-{n}-", created=5, finished=4)
    await _rows(service, [9_000_000_000_000_000_000], prefix="fresh-", created=0, finished=0)

    stats = await prune_service(service, older_than=HOUR, batch_size=10)

    assert stats.deleted == 12
    assert stats.ranges == 4, "empty id stretches were walked range by range"
    assert await _cids(service) == {"fresh-9000000000000000000"}


async def test_prune_service_stops_at_the_first_range_created_after_the_cutoff(service: Any) -> None:
    """A long tail of recent rows costs one range: the walk stops where all rows are newer than the cutoff."""
    await _rows(service, range(1, 21), prefix="old-", created=5, finished=4)
    # A long producer transaction: created before the cut-off, finished after it; it keeps the walk going.
    await _rows(service, [21], prefix="long-txn-", created=5, finished=0)
    await _rows(service, range(22, 2022), prefix="recent-", created=0, finished=0)

    stats = await prune_service(service, older_than=HOUR, batch_size=10)

    assert stats.deleted == 20
    assert stats.ranges <= 4, f"walked {stats.ranges} ranges through rows newer than the cut-off"
    assert len(await _cids(service)) == 2001


async def test_prune_service_range_delete_uses_the_primary_key_on_a_large_table(service: Any) -> None:
    """On a table of 200k finished rows, one prune step is a primary-key index scan, not a table scan."""
    await service.execute("ALTER TABLE outbox_relay.outbox DISABLE TRIGGER outbox_notify")
    await service.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, outcome, status, attempts, created_at, finished_at)"
        " SELECT 'bulk-' || g, 'success', 'finished', 1, now(), now() FROM generate_series(1, 200000) AS g"
    )
    await service.execute("ANALYZE outbox_relay.outbox")
    step = query("prune_service_range").rstrip(";")
    await service.execute(f"PREPARE prune_step (bigint, bigint, timestamptz, text[]) AS {step}")
    plans = []
    for mode in ("force_custom_plan", "force_generic_plan"):
        await service.execute(f"SET plan_cache_mode = {mode}")
        rows = await service.fetch("EXPLAIN EXECUTE prune_step (1000, 1999, now(), '{finished}')")
        plans.append("\n".join(r[0] for r in rows))
    await service.execute("RESET plan_cache_mode")
    plan, generic = plans
    assert "$1" in generic, generic
    for text in (plan, generic):
        assert "Seq Scan" not in text, text
        assert "outbox_pkey" in text, text

    started = time.monotonic()
    stats = await prune_service(service, older_than=HOUR, batch_size=5000)
    assert stats.deleted == 0
    assert stats.ranges == 1
    assert time.monotonic() - started < 1.0


async def test_prune_service_accepts_a_pool(outbox_env: OutboxEnv, service: Any) -> None:
    """prune_service runs on a pool as well as on a connection (the relay's periodic prune uses its pool)."""
    await _rows(service, range(1, 31), prefix="old-", created=5, finished=4)
    pool = await create_pool(outbox_env.service_url, max_size=2)
    try:
        assert (await prune_service(pool, older_than=HOUR, batch_size=4)).deleted == 30
    finally:
        await pool.close()
    assert await _cids(service) == set()


async def test_pruning_while_rows_flow_loses_nothing_and_settles_each_reservation_once(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """Pruning every finished row over and over while the relay and a worker run loses no pending row."""
    settings = outbox_env.settings(sweep_interval=0.5)
    await open_account(service, "acc", 100_000)
    cids = [f"flow-{i}" for i in range(120)]
    for cid in cids:
        await reserve(service, "acc", 10, cid)
    total = await money_total(service)
    stop = asyncio.Event()
    pruned = 0
    pool = await create_pool(outbox_env.service_url, max_size=1)

    async def prune_loop() -> None:
        nonlocal pruned
        while not stop.is_set():
            pruned += (await prune_service(pool, older_than=0.001, batch_size=7, include_failed=True)).deleted
            await asyncio.sleep(0)

    async with running_worker(settings), running_relay(settings):
        pruner = asyncio.create_task(prune_loop())
        try:
            for n, cid in enumerate(cids):
                await produce(service, cid, "success" if n % 3 else "failure")
                if n == len(cids) // 2:
                    # The second half flows while the pruner is known to be deleting finished rows.
                    await wait_until(_async(lambda: pruned > 0), message="the pruner deleting finished rows")
            await wait_until(
                lambda: _all_settled(service, len(cids)), timeout=30, message="every reservation settled"
            )
        finally:
            stop.set()
            await pruner
            await pool.close()
    assert pruned > 0, "nothing was pruned while rows flowed"
    pruned += (await prune_service(service, older_than=0.001, batch_size=7)).deleted
    assert pruned == len(cids), "rows were pruned before they finished, or not at all"
    assert await count_status(service, "new", "queued", "failed", "finished") == 0
    assert await money_total(service) == total


# -- primary ---------------------------------------------------------------------------


async def test_prune_primary_deletes_only_rows_the_subscriber_has_received(
    outbox_env: OutboxEnv, service: Any, primary: Any
) -> None:
    """Received old rows go; after the subscription is disabled, rows it has not received are kept."""
    settings = outbox_env.settings()
    name = outbox_env.subscription_name
    await subscribe(replication_config(settings))
    await _old_primary_rows(primary, "got-", 30)
    await primary.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, outcome) VALUES ('fresh-1', 'success')"
    )
    await wait_until(lambda: _count(service, "got-%", 30), message="old rows replicated", timeout=30)
    await wait_until(lambda: _count(service, "fresh-%"), message="fresh row replicated", timeout=30)

    assert (await prune_primary(primary, older_than=HOUR, batch_size=7, wait_timeout=30)).deleted == 30
    assert await _count(primary, "got-%") == 0
    assert await _count(primary, "fresh-%") == 1, "a row newer than the cut-off was pruned"
    assert await _count(service, "got-%") == 30, "pruning the primary touched the service database"

    await service.execute(f"ALTER SUBSCRIPTION {quote_ident(name)} DISABLE")
    await wait_until(lambda: _slot_inactive(primary, name), message="slot inactive", timeout=30)
    await _old_primary_rows(primary, "unsent-", 12)

    with pytest.raises(SubscriberLagError, match=name) as caught:
        await prune_primary(primary, older_than=HOUR, batch_size=5, wait_timeout=1.0)
    assert caught.value.lagging == [name]
    assert caught.value.pruned == 0
    assert await _count(primary, "unsent-%") == 12, "rows the subscriber has not received were pruned"
    assert await _count(service, "unsent-%") == 0

    await service.execute(f"ALTER SUBSCRIPTION {quote_ident(name)} ENABLE")
    await wait_until(lambda: _count(service, "unsent-%", 12), message="rows replicated", timeout=30)
    assert (await prune_primary(primary, older_than=HOUR, batch_size=5, wait_timeout=30)).deleted == 12
    assert await _count(service, "unsent-%") == 12


async def test_prune_primary_without_a_slot_refuses_and_deletes_nothing(primary: Any) -> None:
    """With no logical replication slot (no subscriber attached), the primary prune refuses."""
    await _old_primary_rows(primary, "old-", 5)
    with pytest.raises(NoSubscriberError, match="no logical replication slot"):
        await prune_primary(primary, older_than=HOUR, batch_size=10, wait_timeout=1.0)
    assert await _count(primary, "old-%") == 5


async def test_prune_primary_reads_candidates_in_rounds_each_confirmed_by_the_slots(
    outbox_env: OutboxEnv, service: Any, primary: Any
) -> None:
    """More candidates than one round holds are pruned over several snapshots, each waited for."""
    await subscribe(replication_config(outbox_env.settings()))
    await _old_primary_rows(primary, "r-", 50)
    await wait_until(lambda: _count(service, "r-%", 50), message="rows replicated", timeout=30)

    stats = await prune_primary(primary, older_than=HOUR, batch_size=10, round_rows=20)

    assert stats.deleted == 50
    assert stats.rounds == 3
    assert await _count(primary, "r-%") == 0


# -- the command ------------------------------------------------------------------------


def test_prune_command_without_a_retention_exits_2_naming_the_variable(outbox_env: OutboxEnv) -> None:
    """`prune` with neither --older-than nor OUTBOX_RELAY_RETENTION is a usage error naming the variable."""
    result = run_cli("prune", env=_cli_env(outbox_env))
    assert result.returncode == 2, result.stderr
    assert "OUTBOX_RELAY_RETENTION" in result.stderr
    assert "Traceback" not in result.stderr


async def test_prune_command_prunes_the_service_database_with_the_retention_setting(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """`prune` with OUTBOX_RELAY_RETENTION deletes old finished rows and says how many."""
    await _rows(service, range(1, 8), prefix="old-", created=5, finished=4)
    await _rows(service, range(8, 10), prefix="fresh-", created=0, finished=0)
    result = run_cli("prune", env=_cli_env(outbox_env, RETENTION="3600", PRUNE_BATCH_SIZE="3"))
    assert result.returncode == 0, result.stderr
    assert "pruned 7 rows from the service database" in result.stdout
    assert await _cids(service) == {"fresh-8", "fresh-9"}


async def test_prune_command_older_than_and_include_failed_override_the_setting(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """--older-than wins over OUTBOX_RELAY_RETENTION, and --include-failed prunes old failed rows."""
    await _rows(service, range(1, 4), prefix="failed-", status="failed", created=5, finished=4)
    await _rows(service, range(4, 6), prefix="done-", created=5, finished=4)
    env = _cli_env(outbox_env, RETENTION=str(100 * HOUR))
    kept = run_cli("prune", env=env)
    assert kept.returncode == 0, kept.stderr
    assert "pruned 0 rows from the service database" in kept.stdout
    result = run_cli("prune", "--older-than", "3600", "--include-failed", env=env)
    assert result.returncode == 0, result.stderr
    assert "pruned 5 rows from the service database" in result.stdout
    assert await _cids(service) == set()


def test_prune_command_primary_without_a_subscriber_exits_1_with_a_clear_message(
    outbox_env: OutboxEnv,
) -> None:
    """`prune --primary` on a primary with no logical slot exits 1 and says why."""
    result = run_cli("prune", "--primary", "--older-than", "60", env=_cli_env(outbox_env))
    assert result.returncode == 1, result.stderr
    assert "no logical replication slot" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--older-than", "0"],
        ["--older-than", "-5"],
        ["--older-than", "nan"],
        ["--primary", "--include-failed", "--older-than", "60"],
        ["--wait", "5", "--older-than", "60"],
    ],
)
def test_prune_command_rejects_bad_usage_with_exit_2(outbox_env: OutboxEnv, args: list[str]) -> None:
    """A non-positive --older-than, --include-failed with --primary, --wait without --primary: exit 2."""
    result = run_cli("prune", *args, env=_cli_env(outbox_env))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("outbox-relay: ")
    assert "Traceback" not in result.stderr


# -- helpers ---------------------------------------------------------------------------


def _cli_env(outbox_env: OutboxEnv, **settings: str) -> dict[str, str]:
    return cli_env(outbox_env.env(**settings))


async def _count(conn: Any, pattern: str, at_least: int | None = None) -> Any:
    n = int(
        await conn.fetchval("SELECT count(*) FROM outbox_relay.outbox WHERE correlation_id LIKE $1", pattern)
    )
    return n >= at_least if at_least is not None else n


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``check`` as a predicate for :func:`wait_until`."""

    async def predicate() -> bool:
        return check()

    return predicate


async def _all_settled(conn: Any, n: int) -> bool:
    settled = await conn.fetchval("SELECT count(*) FROM ledger.reservations WHERE state <> 'reserved'")
    return int(settled) == n


async def _slot_inactive(primary: Any, name: str) -> bool:
    active = await primary.fetchval("SELECT active FROM pg_replication_slots WHERE slot_name = $1", name)
    return active is False
