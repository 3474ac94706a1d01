"""A worker host cut off the network mid-load (issue 16's must-show, issue 19's item 1).

The relay and one worker run in the root namespace; a second worker runs on a
test host (tests/hosts.py: a network namespace reaching PostgreSQL, Redis and
the webhook receiver through forwarders on its veth). Its link is cut while it
has work in flight: the process keeps running and every socket stays open on
both sides, so the server keeps its sessions, as with a host that vanished.
Each test measures the time from the cut to the last row finished, checks that
the cut host's sessions hold no lock after it, restores the link and checks the
host goes on without harm.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from tests.conftest import OutboxEnv
from tests.helpers import Service, Services, cli_env, count_status, equals, http_get, idle
from tests.hosts import Host, netns_unavailable, network_host, start_worker_on
from tests.integration.sinks_support import SECRET, insert_events, serving
from tests.integration.test_faults import assert_settled, prepare_load, produce

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 3.0
#: arq's in-progress key of a job outlives JOB_TIMEOUT by 6 s (outbox_relay/arq_adapter/consumer.py):
#: the cut host's jobs run elsewhere after that; the rest of the bound is the machine's slack.
BOUND = JOB_TIMEOUT + 6 + 6


@pytest.fixture
def host() -> Iterator[Host]:
    """A test host in a network namespace (skipped, saying why, where namespaces cannot be made)."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with network_host() as made:
        yield made


@dataclass
class SlowReceiver:
    """A webhook endpoint on 127.0.0.1 answering 200 after ``delay``; it tells the cut host's
    requests (they come through its forwarder) from the others."""

    host: Host
    delay: float = 0.2
    url: str = ""
    ids: Counter[str] = field(default_factory=Counter)
    from_host: Counter[str] = field(default_factory=Counter)
    in_flight_from_host: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        wid = request.headers["webhook-id"]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ours = peer is not None and peer[1] in self.host.upstream_ports()
        self.ids[wid] += 1
        if ours:
            self.from_host[wid] += 1
            self.in_flight_from_host += 1
        try:
            await asyncio.sleep(self.delay)  # the endpoint's own latency: deliveries are in flight
            return web.Response(status=200)
        finally:
            if ours:
                self.in_flight_from_host -= 1


@contextlib.asynccontextmanager
async def slow_receiver(host: Host) -> AsyncIterator[SlowReceiver]:
    """Run a :class:`SlowReceiver` for the block."""
    receiver = SlowReceiver(host)
    async with serving(receiver.handle) as url:
        receiver.url = url
        yield receiver


async def host_sessions(conn: Any, host: Host) -> list[dict[str, Any]]:
    """The cut host's sessions on the service database (by the forwarders' upstream ports): state,
    what it waits for, whether a transaction is open and holds an xid, its statement, its locks."""
    rows = await conn.fetch(
        "SELECT a.pid, a.state, a.wait_event, a.xact_start IS NOT NULL AS in_transaction,"
        " a.backend_xid IS NOT NULL AS has_xid, left(a.query, 80) AS query,"
        " (SELECT array_agg(l.locktype || ':' || coalesce(l.relation::regclass::text, '') || ':' || l.mode)"
        "   FROM pg_locks l WHERE l.pid = a.pid AND l.locktype <> 'virtualxid') AS locks"
        " FROM pg_stat_activity a WHERE a.datname = current_database() AND a.client_port = ANY($1::int[])",
        sorted(host.upstream_ports()),
    )
    return [dict(r) for r in rows]


async def assert_no_row_locked(conn: Any, host: Host) -> list[dict[str, Any]]:
    """No session of the cut host holds a row lock (a row locked or written gives its transaction an
    xid; a tuple lock is a row lock being waited for) and every outbox row can be locked at once;
    the host's sessions (they may well still exist, some inside a transaction: see the report)."""
    sessions = await host_sessions(conn, host)
    holding = [s for s in sessions if s["has_xid"] or any(lk.startswith("tuple") for lk in s["locks"] or [])]
    assert not holding, f"the cut host's sessions hold row locks: {holding}"
    async with conn.transaction():  # a live worker's lock is gone in ms; a vanished host's never
        await conn.execute("SET LOCAL lock_timeout = '3s'")
        await conn.execute("SELECT id FROM outbox_relay.outbox FOR UPDATE")
    return sessions


def describe_sessions(sessions: list[dict[str, Any]]) -> str:
    """The host's sessions after the bound, in a line: how many, how many in a transaction (and the
    relation locks those hold)."""
    open_ = [s for s in sessions if s["in_transaction"]]
    locks = sorted({lk for s in open_ for lk in s["locks"] or []})
    states = Counter(f"{s['state']}/{s['wait_event']}" for s in open_)
    return (
        f"the host's sessions after it: {len(sessions)}, none holding a row lock;"
        f" {len(open_)} inside a transaction ({dict(states)}), relation locks {locks}"
    )


async def finished_metric(service: Service) -> float:
    """The rows a worker finished, by its /metrics (0 while it does not answer)."""
    assert service.port is not None
    status, text = await http_get(service.port, "/metrics", service.host)
    if status != 200:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("outbox_relay_events_total{") and 'result="finished"' in line
    )


async def busy(worker: Service, n: float) -> bool:
    """True once ``worker`` has finished ``n`` rows or more and has jobs in flight."""
    assert worker.port is not None
    status, text = await http_get(worker.port, "/metrics", worker.host)
    in_flight = "outbox_relay_worker_jobs_in_flight 0.0" not in text
    return status == 200 and in_flight and await finished_metric(worker) >= n


async def last_finished_after(conn: Any, cut_at: float) -> float:
    """Seconds from ``cut_at`` (epoch) to the last row finished."""
    last = await conn.fetchval("SELECT extract(epoch FROM max(finished_at))::float8 FROM outbox_relay.outbox")
    return float(last) - cut_at


async def finished_rows(conn: Any) -> dict[int, Any]:
    """id -> finished_at of every finished row."""
    rows = await conn.fetch("SELECT id, finished_at FROM outbox_relay.outbox WHERE status = 'finished'")
    return {r["id"]: r["finished_at"] for r in rows}


async def rejoin(conn: Any, host: Host, services: Services, worker: Service) -> None:
    """The link comes back: the host's worker is ready again, ends what it still had (fenced: no
    finished row changes), and shows no error that needs a person."""
    before = await finished_rows(conn)
    logged = len(worker.text())
    host.restore()
    await services.ready(worker, role="worker", timeout=30)
    await services.wait(lambda: idle(worker), timeout=30, message="the host's worker idle")
    assert await finished_rows(conn) == before, "a row finished before was finished again"
    assert worker.running()
    text = worker.text()[logged:]
    assert "Traceback" not in text, f"the host's worker:\n{text[-3000:]}"
    assert " ERROR " not in text, f"the host's worker:\n{text[-3000:]}"


async def test_a_webhook_worker_host_cut_mid_delivery_is_replaced_within_the_bound(
    outbox_env: OutboxEnv, service: Any, services: Services, host: Host
) -> None:
    """1,500 webhook rows, a 200 ms endpoint: the host's link is cut with its deliveries in flight;
    every row is delivered and finished within JOB_TIMEOUT + 12 s, a repeat only under the same
    webhook-id, the host's sessions hold no lock; back, the host goes on and finishes nothing twice."""
    async with slow_receiver(host) as receiver:
        env = cli_env(
            # 8 jobs of 50 rows, 64 deliveries in flight at 200 ms: a worker's jobs end well within
            # JOB_TIMEOUT (with 32 jobs a worker takes more than it can deliver in time: repeats).
            outbox_env.env(
                routes="ev.*=webhook",
                job_timeout=str(JOB_TIMEOUT),
                max_attempts="20",
                worker_concurrency="8",
            ),
            OUTBOX_RELAY_WEBHOOK_URL=receiver.url,
            OUTBOX_RELAY_WEBHOOK_SECRET=SECRET,
            OUTBOX_RELAY_WEBHOOK_TIMEOUT=str(JOB_TIMEOUT),
        )
        await services.start_fleet(env, workers=("worker-root",))
        cut_worker = start_worker_on(host, services, "worker-host", env)
        await services.ready(cut_worker, role="worker")
        cids = await insert_events(service, "cut", 1500)
        await services.wait(
            lambda: receiver.in_flight_from_host >= 5 and sum(receiver.from_host.values()) >= 50,
            message="the host's deliveries in flight",
        )
        host.cut()
        cut_at, in_flight = time.time(), receiver.in_flight_from_host
        before_cut = sum(receiver.from_host.values())
        await services.wait(
            lambda: equals(count_status(service, "finished"), 1500), timeout=60, message="1500 finished"
        )
        took = await last_finished_after(service, cut_at)
        sessions = await assert_no_row_locked(service, host)
        await rejoin(service, host, services, cut_worker)
        more = await insert_events(service, "after", 800)  # 16 jobs: more than the root worker holds
        await services.wait(
            lambda: equals(count_status(service, "finished"), 2300), timeout=60, message="2300 finished"
        )
    assert set(receiver.ids) == set(cids) | set(more), "a delivery under an id of no row"
    twice = sorted(i for i, n in receiver.ids.items() if n > 1)
    alone = [i for i in twice if not receiver.from_host[i]]
    assert not alone, f"repeats the cut did not cause: {alone[:10]}"
    assert any(receiver.from_host[i] for i in more), "the host's worker took no new row after the cut"
    print(
        f"\n[host cut] webhook: {before_cut} requests from the host before the cut, {in_flight} in flight;"
        f" last row finished {took:.1f} s after the cut (JOB_TIMEOUT {JOB_TIMEOUT:g});"
        f" {len(twice)} ids delivered twice; {describe_sessions(sessions)}"
    )
    assert took < BOUND, f"the last row finished {took:.1f} s after the cut\n{services.tails()}"


async def test_a_reservation_worker_host_cut_mid_load_loses_nothing_and_applies_each_effect_once(
    outbox_env: OutboxEnv, services: Services, host: Host
) -> None:
    """3,000 reservation rows streaming in (10 per commit): the host's link is cut while
    it has jobs in flight; every row finishes within JOB_TIMEOUT + 12 s of the cut, each effect once,
    money conserved, no row lock held by the host's sessions; back, the host goes on and finishes
    nothing twice."""
    load = await prepare_load(outbox_env.service_url, 3000, prefix="cut")
    env = cli_env(outbox_env.env(job_timeout=str(JOB_TIMEOUT), max_attempts="20"))
    # The root worker takes 2 jobs at a time, the host 32: the host, though farther, does its share.
    await services.start_fleet({**env, "OUTBOX_RELAY_WORKER_CONCURRENCY": "2"}, workers=("worker-root",))
    cut_worker = start_worker_on(host, services, "worker-host", env)
    await services.ready(cut_worker, role="worker")
    conn = await asyncpg.connect(outbox_env.service_url)
    producer = asyncio.create_task(produce(outbox_env.service_url, load.rows, chunk=10, pause=0.02))
    try:
        await services.wait(lambda: busy(cut_worker, 50), message="the host's jobs in flight")
        host.cut()
        cut_at = time.time()
        done_at_cut = await count_status(conn, "finished")
        await producer
        await services.wait(
            lambda: equals(count_status(conn, "finished"), 3000), timeout=60, message="3000 finished"
        )
        took = await last_finished_after(conn, cut_at)
        delayed = await conn.fetchval(
            "SELECT count(*) FROM outbox_relay.outbox WHERE finished_at > to_timestamp($1)",
            cut_at + JOB_TIMEOUT,
        )
        sessions = await assert_no_row_locked(conn, host)
        await rejoin(conn, host, services, cut_worker)
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        await conn.close()
    await assert_settled(outbox_env.service_url, load)
    print(
        f"\n[host cut] reservations: cut with {done_at_cut} of 3000 finished; last row finished {took:.1f} s"
        f" after the cut (JOB_TIMEOUT {JOB_TIMEOUT:g}), {delayed} rows finished later than JOB_TIMEOUT after"
        f" it; {describe_sessions(sessions)}"
    )
    assert took < BOUND, f"the last row finished {took:.1f} s after the cut\n{services.tails()}"
