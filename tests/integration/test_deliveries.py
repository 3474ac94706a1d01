"""Deliveries outside transactions (contract 5.9): claims, no lock across a call, frozen workers,
slow endpoints, the job's deadline, a rolling change of ROUTES."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from typing import Any

from aiohttp import web

from outbox_relay.composition import plugins
from outbox_relay.handlers import HandlerRegistry
from tests.conftest import OutboxEnv
from tests.helpers import (
    Services,
    cli_env,
    count_status,
    equals,
    idle,
    running_relay,
    running_worker,
    wait_until,
)
from tests.integration.sinks_support import SECRET, insert_events, receiving, routed_registry, serving


def _webhook(url: str, timeout: float = 2.0) -> dict[str, Any]:
    return {"url": url, "secret": SECRET, "timeout": timeout}


async def _longest_open_transaction(service: Any) -> float:
    """Seconds the oldest transaction of a worker's session has been open (0: none open)."""
    age = await service.fetchval(
        "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)::float8"
        " FROM pg_stat_activity WHERE application_name LIKE 'outbox_relay.%' AND xact_start IS NOT NULL"
        " AND state <> 'active'"
    )
    return float(age)


async def test_a_hung_endpoint_holds_no_transaction_and_no_row_lock(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """While every delivery hangs on the endpoint, no worker session sits idle in a transaction
    for longer than a statement, and the rows it claimed can be updated at once (no lock)."""
    release = asyncio.Event()
    seen = 0

    async def hang(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        await release.wait()
        return web.Response(status=200)

    async with serving(hang) as url:
        settings = outbox_env.settings(routes="ev.*=webhook", job_timeout=4.0)
        registry = routed_registry(settings, webhook=_webhook(url, timeout=4.0))
        await insert_events(service, "hung", 20)
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(lambda: seen >= 20, timeout=20, message="20 deliveries in flight")
            longest = 0.0
            for _ in range(20):
                longest = max(longest, await _longest_open_transaction(service))
                await asyncio.sleep(0.05)
            assert longest < 0.5, f"a worker session held a transaction open for {longest:.2f} s"
            async with service.transaction():
                await service.execute("SET LOCAL lock_timeout = '200ms'")
                await service.execute("UPDATE outbox_relay.outbox SET payload = payload")  # no row locked
            release.set()
            await wait_until(
                lambda: equals(count_status(service, "finished"), 20), timeout=30, message="done"
            )


async def test_a_worker_frozen_mid_delivery_is_replaced_within_job_timeout_and_finishes_nothing_twice(
    outbox_env: OutboxEnv, service: Any, services: Services
) -> None:
    """Worker A is SIGSTOPped while its request is at the endpoint: worker B delivers the same
    delivery id within JOB_TIMEOUT + a few seconds and finishes the row; A, thawed, changes nothing."""
    job_timeout = 3.0
    arrivals: list[tuple[float, str]] = []
    first = asyncio.Event()
    hold = asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        arrivals.append((time.monotonic(), request.headers["webhook-id"]))
        if len(arrivals) == 1:
            first.set()
            await hold.wait()  # A's request: answered only after the test is over
        return web.Response(status=200)

    async with serving(answer) as url:
        env = cli_env(
            outbox_env.env(
                routes="ev.*=webhook",
                job_timeout=str(job_timeout),
                requeue_after="3600",
                sweep_interval="3600",
            ),
            OUTBOX_RELAY_WEBHOOK_URL=url,
            OUTBOX_RELAY_WEBHOOK_SECRET=SECRET,
            OUTBOX_RELAY_WEBHOOK_TIMEOUT=str(job_timeout),
        )
        _relay, worker_a = await services.start_fleet(env, workers=("worker-a",))
        [cid] = await insert_events(service, "frozen", 1)
        await services.wait(first.wait, timeout=20, message="A's request at the endpoint")
        os.kill(worker_a.proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            worker_b = services.start_worker("worker-b", env)
            await services.ready(worker_b, role="worker")
            await services.wait(
                lambda: equals(count_status(service, "finished"), 1), timeout=30, message="B finished it"
            )
            replaced_after = arrivals[1][0] - frozen_at
        finally:
            os.kill(worker_a.proc.pid, signal.SIGCONT)
        hold.set()  # A's answer arrives and its finish is fenced off, or its job timed out meanwhile
        await services.wait(lambda: idle(worker_a), timeout=30, message="A's job over")
        assert [wid for _, wid in arrivals] == [cid, cid], "B delivered under the same delivery id"
        assert replaced_after < job_timeout + 8, f"B delivered {replaced_after:.1f} s after the freeze"
        row = await service.fetchrow("SELECT status, attempts FROM outbox_relay.outbox")
        assert (row["status"], row["attempts"]) == ("finished", 1)
        assert "Traceback" not in worker_a.text()


async def test_a_slow_endpoint_gets_each_event_once_and_no_attempt_is_wasted(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """An endpoint answering after 250 ms, 3,000 rows committed at once: every row finishes on its
    first attempt, each delivery id is posted exactly once (deliveries overlap within a job)."""
    ids: Counter[str] = Counter()

    async def slow(request: web.Request) -> web.Response:
        ids[request.headers["webhook-id"]] += 1
        await asyncio.sleep(0.25)
        return web.Response(status=200)

    async with serving(slow) as url:
        settings = outbox_env.settings(routes="ev.*=webhook", job_timeout=10.0)
        registry = routed_registry(settings, webhook=_webhook(url, timeout=5.0))
        await insert_events(service, "slow", 3000)
        started = time.monotonic()
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(
                lambda: equals(count_status(service, "finished"), 3000), timeout=120, message="3000 finished"
            )
        elapsed = time.monotonic() - started
    assert len(ids) == 3000
    assert max(ids.values()) == 1, f"posted twice: {[k for k, v in ids.items() if v > 1][:5]}"
    assert await service.fetchval("SELECT max(attempts) FROM outbox_relay.outbox") == 1
    print(f"[deliveries] 3000 rows at 250 ms each: {elapsed:.1f} s ({3000 / elapsed:.0f} rows/s)")


async def test_a_delivery_cut_by_the_jobs_deadline_names_the_sink_and_late_ones_are_put_off(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """An endpoint that sits on each event's first request past JOB_TIMEOUT (2 s): the delivery is cut
    at the job's deadline as `webhook: no acknowledgement ...` (never a bare TimeoutError); with one
    slot, rows that could not start with half the job left are put off, uncounted; all finish."""
    seen: Counter[str] = Counter()

    async def stall_first(request: web.Request) -> web.Response:
        seen[request.headers["webhook-id"]] += 1
        if seen[request.headers["webhook-id"]] == 1:
            await asyncio.sleep(2.5)
        return web.Response(status=200)

    async with serving(stall_first) as url:
        settings = outbox_env.settings(
            routes="ev.*=webhook", job_timeout=2.0, sink_in_flight=1, max_attempts=50
        )
        registry = routed_registry(settings, webhook=_webhook(url, timeout=2.0))
        await insert_events(service, "cut", 3)
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(lambda: equals(count_status(service, "finished"), 3), timeout=60, message="done")
    errors = await service.fetchval(
        "SELECT string_agg(e->>'error', ' | ') FROM outbox_relay.outbox, jsonb_array_elements(errors) e"
    )
    assert errors is not None
    assert "webhook: no acknowledgement within" in errors
    assert "TimeoutError" not in errors
    attempts = await service.fetchval("SELECT max(attempts) FROM outbox_relay.outbox")
    assert attempts == 2, "each row: one cut attempt, then one that finished (put-offs are not counted)"


async def test_a_worker_without_the_route_hands_rows_back_while_another_worker_routes_them(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """A rolling change of ROUTES: a worker without `ev.*=webhook` hands the rows back untouched while
    a live worker routes them, so none fails; with no live worker routing them they fail as before."""
    async with receiving() as receiver:
        routed_settings = outbox_env.settings(routes="ev.*=webhook")
        routed = routed_registry(routed_settings, webhook=_webhook(receiver.url))
        plain_settings = outbox_env.settings()
        plain = plugins(plain_settings, HandlerRegistry())
        async with running_worker(plain_settings, plain), running_relay(plain_settings):
            async with running_worker(routed_settings, routed):
                await wait_until(
                    lambda: service.fetchval("SELECT count(*) = 2 FROM outbox_relay.workers"),
                    timeout=20,
                    message="both workers listed",
                )
                await insert_events(service, "roll", 100)
                await wait_until(
                    lambda: equals(count_status(service, "finished"), 100), timeout=60, message="100 finished"
                )
            assert await count_status(service, "failed") == 0
            await wait_until(
                lambda: service.fetchval("SELECT count(*) = 1 FROM outbox_relay.workers"),
                timeout=10,
                message="the routed worker unlisted",
            )
            await insert_events(service, "orphan", 5)
            await wait_until(
                lambda: equals(count_status(service, "failed"), 5), timeout=30, message="5 failed"
            )
    assert (
        await service.fetchval("SELECT max(attempts) FROM outbox_relay.outbox WHERE status = 'finished'") == 1
    )
    reasons = await service.fetch(
        "SELECT DISTINCT last_error FROM outbox_relay.outbox WHERE status = 'failed'"
    )
    assert all("unknown kind" in r["last_error"] for r in reasons)
    assert len({h["webhook-id"] for _, h, _ in receiver.requests}) == 100
