"""The failure history (contract section 2, `errors`): written by the worker, kept, bounded to 10."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from outbox_relay.admin import requeue, status
from outbox_relay.composition import worker_config
from outbox_relay.db import Connection, create_pool
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.worker import RowProcessor
from tests.conftest import OutboxEnv
from tests.helpers import produce

calls: Counter[str] = Counter()
handlers = HandlerRegistry()


@handlers.register("down")
async def always_down(conn: Connection, event: OutboxEvent) -> None:
    calls[event.correlation_id] += 1
    raise ConnectionError(f"down #{calls[event.correlation_id]}")


@handlers.register("recovers")
async def down_twice(conn: Connection, event: OutboxEvent) -> None:
    calls[event.correlation_id] += 1
    if calls[event.correlation_id] <= 2:
        raise ConnectionError(f"not yet #{calls[event.correlation_id]}")


@handlers.register("refused")
async def refused(conn: Connection, event: OutboxEvent) -> None:
    raise PermanentError("no such user")


@pytest.fixture
async def make_processor(outbox_env: OutboxEnv) -> AsyncIterator[Any]:
    """Builds RowProcessors with the test handlers and a given MAX_ATTEMPTS, on one pool."""
    pool = await create_pool(outbox_env.service_url, max_size=4)

    def build(max_attempts: int) -> RowProcessor:
        return RowProcessor(worker_config(outbox_env.settings(max_attempts=max_attempts)), pool, handlers)

    try:
        yield build
    finally:
        await pool.close()


async def _row(service: Any, cid: str) -> Any:
    return await service.fetchrow(
        "SELECT id, status, attempts, last_error, errors::text AS errors FROM outbox_relay.outbox "
        "WHERE correlation_id = $1",
        cid,
    )


async def _deliver_until_done(processor: RowProcessor, row_id: int, limit: int = 50) -> str:
    for _ in range(limit):
        outcome = await processor.process(row_id)
        if outcome.result != "retried":
            return outcome.result
    raise AssertionError(f"row {row_id} still retrying after {limit} deliveries")


async def test_history_keeps_the_last_ten_failures_oldest_first(
    outbox_env: OutboxEnv, service: Any, make_processor: Any
) -> None:
    """Twelve failed attempts leave attempts 3..12 in `errors`, oldest first, each with at/attempt/error."""
    await produce(service, "h-12", kind="down")
    row_id = (await _row(service, "h-12"))["id"]
    assert await _deliver_until_done(make_processor(12), row_id) == "failed"
    row = await _row(service, "h-12")
    errors = json.loads(row["errors"])
    assert (row["status"], row["attempts"]) == ("failed", 12)
    assert [e["attempt"] for e in errors] == list(range(3, 13))
    assert [e["error"] for e in errors] == [f"ConnectionError: down #{n}" for n in range(3, 13)]
    assert all(set(e) == {"at", "attempt", "error"} for e in errors)
    stamps = [datetime.fromisoformat(e["at"]) for e in errors]
    assert stamps == sorted(stamps)
    assert all(s.tzinfo is not None for s in stamps)
    assert row["last_error"] == errors[-1]["error"]


async def test_history_is_kept_when_a_later_attempt_succeeds(
    outbox_env: OutboxEnv, service: Any, make_processor: Any
) -> None:
    """A row failing twice and then finishing keeps both failures in `errors` (last_error is cleared)."""
    await produce(service, "h-rec", kind="recovers")
    row_id = (await _row(service, "h-rec"))["id"]
    assert await _deliver_until_done(make_processor(5), row_id) == "finished"
    row = await _row(service, "h-rec")
    assert (row["status"], row["attempts"], row["last_error"]) == ("finished", 3, None)
    assert [(e["attempt"], e["error"]) for e in json.loads(row["errors"])] == [
        (1, "ConnectionError: not yet #1"),
        (2, "ConnectionError: not yet #2"),
    ]


async def test_history_survives_requeue_and_grows_after_it(
    outbox_env: OutboxEnv, service: Any, make_processor: Any
) -> None:
    """`requeue` resets attempts but keeps `errors`; the next failure is appended (attempt 1 again)."""
    await produce(service, "h-perm", kind="refused")
    row_id = (await _row(service, "h-perm"))["id"]
    processor = make_processor(5)
    assert await _deliver_until_done(processor, row_id) == "failed"
    assert len(json.loads((await _row(service, "h-perm"))["errors"])) == 1

    result = await requeue(service, correlation_ids=["h-perm"])
    assert result.requeued == 1
    row = await _row(service, "h-perm")
    assert (row["status"], row["attempts"]) == ("new", 0)
    assert [e["error"] for e in json.loads(row["errors"])] == ["no such user"]

    assert await _deliver_until_done(processor, row_id) == "failed"
    errors = json.loads((await _row(service, "h-perm"))["errors"])
    assert [(e["attempt"], e["error"]) for e in errors] == [(1, "no such user"), (1, "no such user")]

    report = await status(service)
    assert [(f.correlation_id, len(f.errors)) for f in report.failed] == [("h-perm", 2)]
    assert report.as_json()["failed"][0]["errors"] == errors


async def test_a_row_turning_failed_logs_a_row_failed_warning(
    outbox_env: OutboxEnv, service: Any, make_processor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Both ways a row turns failed (permanent, last transient attempt) log WARNING event=row_failed."""
    await produce(service, "w-perm", kind="refused")
    await produce(service, "w-last", kind="down")
    processor = make_processor(2)
    with caplog.at_level(logging.INFO, logger="outbox_relay.worker.processor"):
        for cid in ("w-perm", "w-last"):
            assert await _deliver_until_done(processor, (await _row(service, cid))["id"]) == "failed"
    events = [r for r in caplog.records if getattr(r, "event", None) == "row_failed"]
    assert [r.levelno for r in events] == [logging.WARNING, logging.WARNING]
    assert [r.error for r in events] == ["no such user", "ConnectionError: down #2"]  # type: ignore[attr-defined]
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == 1
    assert getattr(retried[0], "event", None) is None
