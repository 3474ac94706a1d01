"""The effects of outbox rows on the ledger: burn, reclaim, exactly once, permanent and transient failures."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from outbox_relay.composition import worker_config
from outbox_relay.db import Connection, create_pool
from outbox_relay.domains.reservation import settle_reservation
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError
from outbox_relay.handlers import HandlerRegistry, registry
from outbox_relay.worker import RowProcessor
from tests.conftest import OutboxEnv
from tests.helpers import (
    count_status,
    equals,
    money_total,
    open_account,
    reserve,
    running_relay,
    running_worker,
    wait_until,
)

BALANCE = 10_000


#: The reservation handler without its fast path: every delivery takes the general path.
_GENERAL_PATH_ONLY = HandlerRegistry()
_GENERAL_PATH_ONLY.register("reservation")(settle_reservation)


async def _process(processor: RowProcessor, row_id: int, kind: str | None) -> str:
    """Deliver row ``row_id``'s job once: with the fast path (``kind`` set) or the general path only."""
    if kind is None:
        processor = RowProcessor(processor.config, processor.pool, _GENERAL_PATH_ONLY)
    return (await processor.process(row_id)).result


@pytest.fixture
async def processor(outbox_env: OutboxEnv) -> AsyncIterator[RowProcessor]:
    """A RowProcessor with the shipped handlers, on a pool of its own."""
    pool = await create_pool(outbox_env.service_url, max_size=4)
    try:
        yield RowProcessor(worker_config(outbox_env.settings()), pool, registry)
    finally:
        await pool.close()


async def test_success_burns_and_failure_reclaims_with_money_conserved(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """success burns (balance unchanged), failure gives the amount back; money is conserved."""
    settings = outbox_env.settings(sweep_interval=1)
    await open_account(service, "acc", BALANCE)
    outcomes = {f"eff-{i}": ("success" if i % 3 else "failure") for i in range(30)}
    amounts = {cid: 10 + i for i, cid in enumerate(outcomes)}
    for cid, amount in amounts.items():
        await reserve(service, "acc", amount, cid)
    total = await money_total(service)
    after_reserving = BALANCE - sum(amounts.values())
    assert await _balance(service, "acc") == after_reserving

    async with running_worker(settings), running_relay(settings):
        for cid, outcome in outcomes.items():
            await _insert(service, cid, outcome)
        await wait_until(
            lambda: equals(count_status(service, "finished"), len(outcomes)),
            timeout=30,
            message="every row finished",
        )

    states = dict(await service.fetch("SELECT correlation_id, state FROM ledger.reservations"))
    assert states == {cid: ("burned" if o == "success" else "reclaimed") for cid, o in outcomes.items()}
    reclaimed = sum(amounts[cid] for cid, o in outcomes.items() if o == "failure")
    assert await _balance(service, "acc") == after_reserving + reclaimed
    assert await money_total(service) == total
    rows = await service.fetch("SELECT attempts, last_error, finished_at FROM outbox_relay.outbox")
    assert all(r["attempts"] == 1 and r["last_error"] is None and r["finished_at"] for r in rows)


@pytest.mark.parametrize("kind", [None, "reservation"], ids=["general-path", "fast-path"])
async def test_same_job_delivered_twice_in_a_row_settles_once(
    service: Any, processor: RowProcessor, kind: str | None
) -> None:
    """A second delivery of an already applied job changes nothing."""
    await open_account(service, "acc", BALANCE)
    await reserve(service, "acc", 300, "dup-seq")
    total = await money_total(service)
    row_id = await _insert(service, "dup-seq", "failure")

    assert await _process(processor, row_id, kind) == "finished"
    assert await _process(processor, row_id, kind) == "duplicate"

    assert await _state(service, "dup-seq") == "reclaimed"
    assert await _balance(service, "acc") == BALANCE, "the amount was given back more than once"
    assert await money_total(service) == total
    row = await _row(service, "dup-seq")
    assert (row["status"], row["attempts"]) == ("finished", 1)


@pytest.mark.parametrize("kind", [None, "reservation"], ids=["general-path", "fast-path"])
async def test_same_job_delivered_twice_concurrently_settles_once(
    service: Any, processor: RowProcessor, kind: str | None
) -> None:
    """Two concurrent deliveries of the same job: one applies it, the other changes nothing."""
    await open_account(service, "acc", BALANCE)
    cids = [f"dup-conc-{i}" for i in range(10)]
    for cid in cids:
        await reserve(service, "acc", 100, cid)
    total = await money_total(service)
    ids = [await _insert(service, cid, "failure") for cid in cids]

    deliveries = [_process(processor, row_id, kind) for row_id in ids for _ in range(2)]
    results = await asyncio.gather(*deliveries)

    for i in range(len(ids)):
        assert sorted(results[2 * i : 2 * i + 2]) == ["duplicate", "finished"]
    assert await _balance(service, "acc") == BALANCE, "some amount was given back twice"
    assert await money_total(service) == total
    assert {await _state(service, cid) for cid in cids} == {"reclaimed"}
    assert await service.fetchval("SELECT sum(attempts) FROM outbox_relay.outbox") == len(cids)


@pytest.mark.parametrize("kind", [None, "reservation"], ids=["general-path", "fast-path"])
async def test_reservation_already_settled_finishes_the_row_and_changes_nothing(
    service: Any, processor: RowProcessor, kind: str | None
) -> None:
    """A row whose reservation is already settled ends finished and settles nothing a second time."""
    await open_account(service, "acc", BALANCE)
    await reserve(service, "acc", 250, "settled-burned")
    await reserve(service, "acc", 150, "settled-reclaimed")
    await service.execute(
        "UPDATE ledger.reservations SET state = 'burned', settled_at = now()"
        " WHERE correlation_id = 'settled-burned'"
    )
    # Settled out of band as the shipped handler would: amount back on the account.
    await service.execute(
        "UPDATE ledger.reservations SET state = 'reclaimed', settled_at = now()"
        " WHERE correlation_id = 'settled-reclaimed'"
    )
    await service.execute("UPDATE ledger.accounts SET balance = balance + 150 WHERE id = 'acc'")
    balance = await _balance(service, "acc")
    total = await money_total(service)
    # The outcome asks for the opposite of what already happened: nothing may move.
    burned_id = await _insert(service, "settled-burned", "failure")
    reclaimed_id = await _insert(service, "settled-reclaimed", "success")

    assert await _process(processor, burned_id, kind) == "finished"
    assert await _process(processor, reclaimed_id, kind) == "finished"

    assert await _state(service, "settled-burned") == "burned"
    assert await _state(service, "settled-reclaimed") == "reclaimed"
    assert await _balance(service, "acc") == balance
    assert await money_total(service) == total
    for cid in ("settled-burned", "settled-reclaimed"):
        row = await _row(service, cid)
        assert (row["status"], row["attempts"], row["last_error"]) == ("finished", 1, None)


async def test_poison_rows_fail_at_once_while_good_rows_in_the_same_batch_finish(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """Each kind of permanent failure turns its row failed after one attempt with a telling error."""
    settings = outbox_env.settings(sweep_interval=3600, max_attempts=5)
    await open_account(service, "acc", BALANCE)
    good = {f"good-{i}": ("success" if i % 2 else "failure") for i in range(6)}
    # correlation id -> (kind, outcome, payload, fragment expected in last_error)
    poison: dict[str, tuple[str, str | None, str, str]] = {
        "p-kind": ("no_such_kind", "success", "{}", "unknown kind 'no_such_kind'"),
        "p-nores": ("reservation", "success", "{}", "no reservation 'p-nores'"),
        "p-outcome": ("reservation", "maybe", "{}", "outcome must be 'success' or 'failure'"),
        "p-null": ("reservation", None, "{}", "outcome must be 'success' or 'failure'"),
        "p-list": ("reservation", "success", "[1, 2]", "malformed payload"),
        "p-string": ("reservation", "failure", '"x"', "malformed payload"),
        "p-jsonnull": ("reservation", "success", "null", "malformed payload"),
    }
    for cid in [*good, *(c for c in poison if c != "p-nores")]:
        await reserve(service, "acc", 100, cid)
    total = await money_total(service)

    async with running_worker(settings), running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set(), message="relay active")
        async with service.transaction():  # one commit: the rows reach the relay together
            for cid, outcome in good.items():
                await _insert(service, cid, outcome)
            for cid, (kind, poison_outcome, payload, _) in poison.items():
                await _insert(service, cid, poison_outcome, kind=kind, payload=payload)
        await wait_until(
            lambda: equals(count_status(service, "finished", "failed"), len(good) + len(poison)),
            timeout=30,
            message="every row finished or failed",
        )

    for cid, (_, _, _, fragment) in poison.items():
        row = await _row(service, cid)
        assert row["status"] == "failed", cid
        assert row["attempts"] == 1, f"{cid} was retried: {row['attempts']} attempts"
        assert fragment in (row["last_error"] or ""), (cid, row["last_error"])
        assert row["finished_at"] is not None
    for cid, outcome in good.items():
        assert (await _row(service, cid))["status"] == "finished", cid
        assert await _state(service, cid) == ("burned" if outcome == "success" else "reclaimed")
    for cid in poison:
        if cid != "p-nores":
            assert await _state(service, cid) == "reserved", f"poison row {cid} settled its reservation"
    assert await money_total(service) == total


async def test_transient_failure_is_retried_until_max_attempts_then_fails(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """A handler raising ConnectionError is retried; after MAX_ATTEMPTS the row is failed with that error."""
    settings = outbox_env.settings(sweep_interval=3600, max_attempts=3)
    await open_account(service, "acc", BALANCE)
    calls: Counter[str] = Counter()
    handlers = HandlerRegistry()

    @handlers.register("flaky")
    async def always_down(conn: Connection, event: OutboxEvent) -> None:
        calls[event.correlation_id] += 1
        await conn.execute("UPDATE ledger.accounts SET balance = balance + 1 WHERE id = 'acc'")
        raise ConnectionError("ledger service unreachable")

    async with running_worker(settings, handlers), running_relay(settings):
        await _insert(service, "flaky-1", "success", kind="flaky")
        await wait_until(lambda: equals(count_status(service, "failed"), 1), timeout=30, message="row failed")

    row = await _row(service, "flaky-1")
    assert row["attempts"] == 3
    assert row["last_error"] == "ConnectionError: ledger service unreachable"
    assert calls["flaky-1"] == 3, f"handler ran {calls['flaky-1']} times for MAX_ATTEMPTS = 3"
    assert await _balance(service, "acc") == BALANCE, "a failed attempt's write was kept"


async def test_transient_failure_that_recovers_finishes_with_the_attempts_counted(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """A handler failing twice, then succeeding, ends finished with attempts = 3 and only its last write."""
    settings = outbox_env.settings(sweep_interval=3600, max_attempts=3)
    await open_account(service, "acc", BALANCE)
    calls: Counter[str] = Counter()
    handlers = HandlerRegistry()

    @handlers.register("recovers")
    async def down_twice(conn: Connection, event: OutboxEvent) -> None:
        calls[event.correlation_id] += 1
        await conn.execute("UPDATE ledger.accounts SET balance = balance + 1 WHERE id = 'acc'")
        if calls[event.correlation_id] <= 2:
            raise ConnectionError("not yet")

    async with running_worker(settings, handlers), running_relay(settings):
        await _insert(service, "rec-1", "success", kind="recovers")
        await wait_until(
            lambda: equals(count_status(service, "finished"), 1), timeout=30, message="row finished"
        )

    row = await _row(service, "rec-1")
    assert (row["status"], row["attempts"], row["last_error"]) == ("finished", 3, None)
    assert calls["rec-1"] == 3
    assert await _balance(service, "acc") == BALANCE + 1, "writes of the failed attempts were kept"


async def test_handler_attempt_that_times_out_is_retried_as_transient(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """An attempt cut off by JOB_TIMEOUT is a transient failure: its writes are undone, the next try wins."""
    settings = outbox_env.settings(sweep_interval=3600, max_attempts=3, job_timeout=0.5)
    await open_account(service, "acc", BALANCE)
    calls: Counter[str] = Counter()
    handlers = HandlerRegistry()

    @handlers.register("hangs_once")
    async def hangs_once(conn: Connection, event: OutboxEvent) -> None:
        calls[event.correlation_id] += 1
        await conn.execute("UPDATE ledger.accounts SET balance = balance + 1 WHERE id = 'acc'")
        if calls[event.correlation_id] == 1:
            await conn.execute("SELECT pg_sleep(30)")  # a stuck statement, cut off by the job timeout

    async with running_worker(settings, handlers), running_relay(settings):
        await _insert(service, "hang-1", "success", kind="hangs_once")
        await wait_until(
            lambda: equals(count_status(service, "finished", "failed"), 1), timeout=30, message="row done"
        )

    row = await _row(service, "hang-1")
    assert (row["status"], row["attempts"], row["last_error"]) == ("finished", 2, None)
    assert calls["hang-1"] == 2
    assert await _balance(service, "acc") == BALANCE + 1, "the timed-out attempt's write was kept"


async def test_writes_of_a_handler_that_fails_permanently_are_rolled_back(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """A handler that writes and then raises PermanentError leaves none of its writes behind."""
    settings = outbox_env.settings(sweep_interval=3600)
    await open_account(service, "acc", BALANCE)
    handlers = HandlerRegistry()

    @handlers.register("writes_then_refuses")
    async def writes_then_refuses(conn: Connection, event: OutboxEvent) -> None:
        await conn.execute("INSERT INTO ledger.accounts (id, balance) VALUES ('side-effect', 5)")
        await conn.execute("UPDATE ledger.accounts SET balance = 0 WHERE id = 'acc'")
        raise PermanentError("refused after writing")

    async with running_worker(settings, handlers), running_relay(settings):
        await _insert(service, "wr-1", "success", kind="writes_then_refuses")
        await wait_until(lambda: equals(count_status(service, "failed"), 1), timeout=30, message="row failed")

    row = await _row(service, "wr-1")
    assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 1, "refused after writing")
    assert await service.fetchval("SELECT count(*) FROM ledger.accounts WHERE id = 'side-effect'") == 0
    assert await _balance(service, "acc") == BALANCE


async def _insert(
    conn: Any, cid: str, outcome: str | None, *, kind: str = "reservation", payload: str = "{}"
) -> int:
    return int(
        await conn.fetchval(
            "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload)"
            " VALUES ($1, $2, $3, $4::jsonb) RETURNING id",
            cid,
            kind,
            outcome,
            payload,
        )
    )


async def _row(conn: Any, cid: str) -> Any:
    return await conn.fetchrow("SELECT * FROM outbox_relay.outbox WHERE correlation_id = $1", cid)


async def _state(conn: Any, cid: str) -> str | None:
    state = await conn.fetchval("SELECT state FROM ledger.reservations WHERE correlation_id = $1", cid)
    return None if state is None else str(state)


async def _balance(conn: Any, account: str) -> int:
    return int(await conn.fetchval("SELECT balance FROM ledger.accounts WHERE id = $1", account))
