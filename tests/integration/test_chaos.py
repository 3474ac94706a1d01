"""Chaos soaks: rows stream in while faults strike at random moments from a fixed seed.

Two relays (one active, one standing by) and two workers run as CLI
subprocesses against a PostgreSQL and a Redis server this module owns. While
rows stream in, a seeded random schedule SIGKILLs or SIGSTOPs/SIGCONTs the
active relay, the standby and the workers, restarts Redis (empty), restarts
PostgreSQL and terminates the services' sessions with ``pg_terminate_backend``.
A killed process is started again, as a supervisor would. Afterwards every row
is ``finished`` or ``failed`` with its reason, each reservation is settled at
most once (exactly once for a finished row) and money is conserved.

The broker soak runs the same fault loop with events of a route to three sinks
(``ev.*=nats+webhook+rabbitmq``) streaming beside the reservations, and adds the
brokers' faults: its own nats-server SIGKILLed and started again (its JetStream
store on disk survives), its own RabbitMQ node SIGKILLed and started again, the
webhook receiver stopped (connections refused) and started again on its port.
Every event must then be in the stream, in the queue and at the receiver.

The normal suite runs the reservation soak about two minutes and the broker soak
about one (seed 7). A long soak:
``OUTBOX_RELAY_SOAK_SECONDS=1800 OUTBOX_RELAY_SOAK_SEED=42 pytest tests/integration/test_chaos.py``
(``-k broker`` for the broker soak alone); the schedule and the outcome are
printed (``-s``) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from outbox_relay.devtools.nats_server import EmbeddedNats
from tests.conftest import OutboxEnv
from tests.helpers import Service, Services, cli_env, run_cli
from tests.integration.rabbitmq_support import declare, drain, forwarding, message_ids, topology
from tests.integration.sinks_support import SECRET, Receiver, make_stream, receiving, stream_contents
from tests.integration.test_faults import (
    ACCOUNTS,
    EXPECTED_STATE,
    OPENING_BALANCE,
    Load,
    ensure_up,
    env,  # noqa: F401  (fixture)
    prepare_load,
    read_ledger,
    servers,  # noqa: F401  (fixture)
)
from tests.servers import PgServer, RedisServer, owned_rabbitmq, session_rabbitmq

SOAK_SECONDS = float(os.environ.get("OUTBOX_RELAY_SOAK_SECONDS", "110"))
BROKER_SOAK_SECONDS = float(os.environ.get("OUTBOX_RELAY_SOAK_SECONDS", "35"))
#: Seconds a soak may take beyond its length (start, producers' catch-up, the rows' settling, checks).
SOAK_SLACK = 420
SEED = int(os.environ.get("OUTBOX_RELAY_SOAK_SEED", "7"))
#: Reservation rows committed per second while the faults strike.
RATE = 20
#: Rows of the routed kind committed per second in the broker soak (beside RATE reservations).
EVENT_RATE = 10
#: Seconds between two faults: drawn uniformly from this range.
FAULT_GAP = (3.0, 7.0)
FAULTS = (
    "kill_active_relay",
    "stop_active_relay",
    "kill_standby",
    "stop_standby",
    "kill_worker",
    "stop_worker",
    "restart_redis",
    "restart_postgres",
    "terminate_backends",
)
#: The broker soak's own faults: two faults in three are these, in turn; the third is one of FAULTS.
BROKER_FAULTS = ("restart_nats", "restart_rabbitmq", "stop_webhook")
ROUTE = "ev.*=nats+webhook+rabbitmq"
EVENT_KIND = "ev.created"
SUBJECT_PREFIX = "chaos."
SOAK_SETTINGS = {
    "job_timeout": "2",
    "requeue_after": "5",
    "sweep_interval": "1",
    "retry_backoff": "0.2",
    "retry_backoff_max": "2",
    "max_attempts": "100",
}
UPSERT = (
    "INSERT INTO outbox_relay.outbox (correlation_id, outcome)"
    " SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT (correlation_id) DO NOTHING"
)
UPSERT_EVENTS = (
    "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload)"
    " SELECT c, k, 'success', jsonb_build_object('id', c) FROM unnest($1::text[], $2::text[]) AS t(c, k)"
    " ON CONFLICT (correlation_id) DO NOTHING"
)

#: Strikes one fault given the drawn pause (seconds): what it struck (for the timeline), or None when
#: there was nothing to strike (the target already down).
Strike = Callable[[float], Awaitable[str | None]]


class Fleet:
    """The relays and workers under test, by role; restarts what was killed."""

    def __init__(self, services: Services, cli: dict[str, str]) -> None:
        self.services = services
        self.cli = cli
        self.relays: dict[str, Service] = {}
        self.workers: dict[str, Service] = {}
        self.restarts: Counter[str] = Counter()

    def start_relay(self, name: str) -> None:
        self.relays[name] = self.services.start_relay(name, self.cli)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self.services.start_worker(name, self.cli)

    async def start(self) -> None:
        """relay-a active, then relay-b (standing by) and worker-1 and worker-2 ready."""
        self.start_relay("relay-a")
        await self.services.ready(self.relays["relay-a"], role="active")
        self.start_relay("relay-b")
        for name in ("worker-1", "worker-2"):
            self.start_worker(name)
        for worker in self.workers.values():
            await self.services.ready(worker, role="worker")

    async def active_relay(self, service_url: str) -> tuple[str, Service] | None:
        """The relay whose pid holds the lease (None while the database is away)."""
        try:
            conn = await asyncpg.connect(service_url, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        try:
            holder = await conn.fetchval("SELECT holder FROM outbox_relay.relay_lease")
        except (OSError, asyncpg.PostgresError):
            return None
        finally:
            conn.terminate()
        for name, relay in self.relays.items():
            if holder and holder.split(":")[1] == str(relay.proc.pid) and relay.running():
                return name, relay
        return None

    def revive(self) -> None:
        """Start again every process that was killed (as systemd or Kubernetes would)."""
        for name, relay in list(self.relays.items()):
            if not relay.running():
                self.restarts[name] += 1
                self.start_relay(name)
        for name, worker in list(self.workers.items()):
            if not worker.running():
                self.restarts[name] += 1
                self.start_worker(name)

    def resume_all(self) -> None:
        for service in [*self.relays.values(), *self.workers.values()]:
            if service.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(service.proc.pid, signal.SIGCONT)


async def stream(
    url: str, rows: Sequence[tuple[str, str]], deadline: float, statement: str = UPSERT, rate: int = RATE
) -> None:
    """Commit the rows (two columns: ``statement``'s two arrays) at ``rate`` a second until all are
    in, retrying across outages (idempotently)."""
    chunk = max(1, rate // 10)
    start = 0
    conn: Any = None
    step_at = time.monotonic()
    while start < len(rows):
        batch = rows[start : start + chunk]
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(url, timeout=3)
            await conn.execute(statement, [a for a, _ in batch], [b for _, b in batch], timeout=5)
        except Exception:  # any client error during an outage: reconnect and retry
            # (asyncpg can raise InternalClientError on a connection cut mid-statement)
            if conn is not None:
                conn.terminate()
            conn = None
            await asyncio.sleep(0.2)  # the database is away: try this batch again shortly
            continue
        start += chunk
        step_at += chunk / rate
        await asyncio.sleep(max(0.0, min(step_at, deadline) - time.monotonic()))  # pacing the load
    if conn is not None:
        await conn.close()


async def terminate_backends(url: str) -> int:
    """pg_terminate_backend every session of the services (relays' listeners, pools, workers)."""
    conn = await asyncpg.connect(url, timeout=3)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'outbox_relay%' AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def settle_check(service_url: str, load: Load, events: Sequence[str] = ()) -> dict[str, int]:
    """Every row finished or failed with its reason (every event row finished), reservations settled
    at most once, money conserved."""
    rows, balances, money = await read_ledger(service_url)
    assert set(rows) == set(load.outcomes) | set(events), "outbox rows lost or made up"
    pending = sorted(cid for cid, r in rows.items() if r["status"] not in ("finished", "failed"))
    assert not pending, f"{len(pending)} rows never finished, e.g. {pending[:5]}"
    reasonless = [cid for cid, r in rows.items() if r["status"] == "failed" and not r["last_error"]]
    assert not reasonless, f"failed rows without a reason: {reasonless[:5]}"
    unfinished = [(cid, rows[cid]["last_error"]) for cid in events if rows[cid]["status"] != "finished"]
    assert not unfinished, f"{len(unfinished)} event rows not finished, e.g. {unfinished[:3]}"
    expected = dict.fromkeys((f"acc-{i}" for i in range(ACCOUNTS)), OPENING_BALANCE)
    for cid, outcome in load.outcomes.items():
        row = rows[cid]
        if row["status"] == "finished":
            wanted = EXPECTED_STATE[outcome]
            assert row["state"] == wanted, f"{cid} finished but its reservation is {row['state']}"
        else:
            assert row["state"] == "reserved", f"{cid} failed but its reservation is {row['state']}"
        if row["state"] in ("reserved", "burned"):
            expected[load.accounts[cid]] -= load.amounts[cid]
    assert balances == expected, "a reservation was settled more than once, or not at all"
    assert money == load.money, f"money not conserved: {load.money} before, {money} after"
    return Counter(r["status"] for r in rows.values())


@dataclass
class Chaos:
    """The fault loop every soak shares: strikes a fault every FAULT_GAP seconds (kind and pause drawn
    from the seeded ``rng``), ends outages when due, restarts what was killed."""

    fleet: Fleet
    service_url: str
    pg: PgServer
    redis: RedisServer
    rng: random.Random
    #: fault kind -> how to strike it; FAULTS are built in, a soak adds its own (``strikes.update``)
    strikes: dict[str, Strike] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    schedule: list[str] = field(default_factory=list)
    #: (due, end of an outage): a SIGCONT, a server started again
    ends: list[tuple[float, Callable[[], Awaitable[None]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for kind in FAULTS:
            self.strikes.setdefault(kind, self._builtin(kind))

    def later(self, seconds: float, end: Callable[[], Awaitable[None]]) -> None:
        """Run ``end`` in ``seconds`` (or when the soak ends, whichever comes first)."""
        self.ends.append((time.monotonic() + seconds, end))

    def _builtin(self, kind: str) -> Strike:
        async def strike(pause: float) -> str | None:
            if kind in ("restart_redis", "restart_postgres", "terminate_backends"):
                action: Coroutine[Any, Any, Any] = (
                    asyncio.to_thread(self.redis.restart)
                    if kind == "restart_redis"
                    else asyncio.to_thread(self.pg.restart)
                    if kind == "restart_postgres"
                    else terminate_backends(self.service_url)
                )
                with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
                    await action
                return ""
            target = await self._target(kind)
            if target is None or not target.running():
                return None
            if kind.startswith("kill"):
                target.proc.kill()
                target.proc.wait(5)
            else:
                os.kill(target.proc.pid, signal.SIGSTOP)
                self.later(pause, lambda: _resume(target))
            return target.name

        return strike

    async def _target(self, kind: str) -> Service | None:
        if kind in ("kill_worker", "stop_worker"):
            return self.fleet.workers[self.rng.choice(sorted(self.fleet.workers))]
        active = await self.fleet.active_relay(self.service_url)
        if active is None:
            return None
        others = [s for n, s in self.fleet.relays.items() if n != active[0]]
        return active[1] if "active" in kind else others[0]

    async def _end_due(self, now: float) -> None:
        for entry in sorted((e for e in self.ends if e[0] <= now), key=lambda e: e[0]):
            self.ends.remove(entry)
            await entry[1]()

    async def run(self, seconds: float, choose: Callable[[int], str]) -> None:
        """Strike faults for ``seconds`` (the i-th fault's kind is ``choose(i)``), then end every
        outage, resume every process and start every server and process again."""
        started = time.monotonic()
        deadline = started + seconds
        next_fault = started + self.rng.uniform(*FAULT_GAP)
        while (now := time.monotonic()) < deadline:
            await self._end_due(now)
            self.fleet.revive()
            if now >= next_fault:
                kind = choose(sum(self.faults.values()))
                pause = self.rng.uniform(2.0, 25.0)
                struck = await self.strikes[kind](pause)
                if struck is not None:
                    self.faults[kind] += 1
                    self.schedule.append(f"{now - started:6.1f}s {kind} {struck}".rstrip())
                next_fault = time.monotonic() + self.rng.uniform(*FAULT_GAP)
            await asyncio.sleep(0.1)  # the chaos loop's tick
        await self._end_due(float("inf"))
        self.fleet.resume_all()
        await ensure_up(self.pg, self.redis)
        self.fleet.revive()

    async def soak(
        self, seconds: float, producers: Sequence[Coroutine[Any, Any, None]], choose: Callable[[int], str]
    ) -> None:
        """:meth:`run` while ``producers`` stream rows in (they are given 120 s more to finish)."""
        tasks = [asyncio.create_task(p) for p in producers]
        try:
            await self.run(seconds, choose)
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        finally:
            self.fleet.resume_all()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def summary(self, seconds: float, rows: int) -> str:
        """Seed, length, rows, faults by kind, restarts, and the timeline."""
        return (
            f"seed={SEED} seconds={seconds:.0f} rows={rows} faults={dict(sorted(self.faults.items()))}"
            f" restarts={dict(self.fleet.restarts)}\n" + "\n".join(self.schedule)
        )

    async def settled(self, rows: int, services: Services, summary: str) -> None:
        """Wait until all ``rows`` are finished or failed (180 s)."""

        async def all_done() -> bool:
            try:
                conn = await asyncpg.connect(self.service_url, timeout=3)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                return False
            try:
                sql = "SELECT count(*) FROM outbox_relay.outbox WHERE status IN ('finished', 'failed')"
                return int(await conn.fetchval(sql)) == rows
            finally:
                await conn.close()

        await services.wait(all_done, timeout=180, message=f"every row finished or failed\n{summary}")


async def _resume(service: Service) -> None:
    if service.running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(service.proc.pid, signal.SIGCONT)


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + SOAK_SLACK)
async def test_chaos_soak_loses_nothing_and_settles_each_reservation_once(
    env: OutboxEnv,  # noqa: F811
    services: Services,
    servers: tuple[PgServer, RedisServer],  # noqa: F811
) -> None:
    """Random SIGKILL/SIGSTOP of relays and workers, Redis and PostgreSQL restarts and terminated
    sessions (seeded): every row ends finished or failed with its reason, money conserved."""
    pg, redis = servers
    rng = random.Random(SEED)
    load = await prepare_load(env.service_url, int(SOAK_SECONDS * RATE), prefix="chaos")
    fleet = Fleet(services, cli_env(env.env(**SOAK_SETTINGS)))
    await fleet.start()
    chaos = Chaos(fleet, env.service_url, pg, redis, rng)
    deadline = time.monotonic() + SOAK_SECONDS
    await chaos.soak(
        SOAK_SECONDS, [stream(env.service_url, load.rows, deadline)], lambda _: rng.choice(FAULTS)
    )
    summary = chaos.summary(SOAK_SECONDS, len(load.rows))
    print(summary)
    await chaos.settled(len(load.rows), services, summary)
    try:
        outcome = await settle_check(env.service_url, load)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{summary}\n{services.tails()}") from None
    print(f"outcome: {dict(outcome)}")
    assert sum(chaos.faults.values()) >= SOAK_SECONDS / 10, f"too few faults struck: {summary}"


# -- the broker soak ------------------------------------------------------------------------------


@dataclass
class Rabbit:
    """The RabbitMQ the workers publish to, and how the soak takes it away and brings it back: a node
    of the test's own SIGKILLed and started again (a real restart), or, where none can be run, a TCP
    forwarder in front of the shared broker closed (every connection dropped, new ones refused) and
    opened again — which plays a restart for the sink without restarting a broker others use."""

    url: str
    direct: str
    down: Callable[[], Awaitable[None]]
    up: Callable[[], Awaitable[None]]
    how: str


@contextlib.asynccontextmanager
async def rabbit() -> AsyncIterator[Rabbit]:
    """A :class:`Rabbit` with an exchange and a durable queue bound for ``ev.#`` (Rabbit.how says
    which), or the test skips with one line when there is no RabbitMQ at all."""
    own = await asyncio.to_thread(owned_rabbitmq)
    if not isinstance(own, str):
        try:

            async def kill() -> None:
                own.kill()

            yield Rabbit(own.url, own.url, kill, lambda: asyncio.to_thread(own.start), "node SIGKILLed")
        finally:
            own.cleanup()
        return
    shared = session_rabbitmq()
    if isinstance(shared, str):
        pytest.skip(f"{own}; {shared}")
    try:
        async with forwarding(shared.url) as forwarder:
            yield Rabbit(forwarder.url(), shared.url, forwarder.close, forwarder.open, "forwarder cut")
    finally:
        shared.cleanup()


@dataclass
class Brokers:
    """The three sinks' servers of the broker soak, their faults, and what they received."""

    nats: EmbeddedNats
    stream: str
    rabbit: Rabbit
    exchange: str
    queue: str
    receiver: Receiver
    down: set[str] = field(default_factory=set)
    #: set when the fixture ends: a soak still running past it (a timeout) starts no server again
    closed: bool = False

    def settings(self) -> dict[str, str]:
        """The workers' route and sink settings (timeouts within JOB_TIMEOUT)."""
        return {
            "routes": ROUTE,
            "nats_url": self.nats.url,
            "nats_subject_prefix": SUBJECT_PREFIX,
            "nats_timeout": "1",
            "webhook_url": self.receiver.url,
            "webhook_secret": SECRET,
            "webhook_timeout": "1",
            "rabbitmq_url": self.rabbit.url,
            "rabbitmq_exchange": self.exchange,
            "rabbitmq_timeout": "1",
            "rabbitmq_connect_timeout": "1",
        }

    def strikes(self, chaos: Chaos) -> dict[str, Strike]:
        """BROKER_FAULTS: each takes its server away for the drawn pause, then brings it back."""
        plans = {
            "restart_nats": (self._kill_nats, self._start_nats, "SIGKILLed"),
            "restart_rabbitmq": (self.rabbit.down, self.rabbit.up, self.rabbit.how),
            "stop_webhook": (self.receiver.stop, self.receiver.start, "receiver stopped"),
        }
        return {kind: self._outage(chaos, kind, *plan) for kind, plan in plans.items()}

    async def _kill_nats(self) -> None:
        self.nats.kill()

    async def _start_nats(self) -> None:
        self.nats.start()  # in the loop's thread (well under a second): it cannot race the cleanup

    def _outage(
        self,
        chaos: Chaos,
        kind: str,
        down: Callable[[], Awaitable[None]],
        up: Callable[[], Awaitable[None]],
        how: str,
    ) -> Strike:
        async def back() -> None:
            if not self.closed:
                await up()
                self.down.discard(kind)

        async def strike(pause: float) -> str | None:
            if kind in self.down:
                return None
            self.down.add(kind)
            await down()
            chaos.later(pause, back)
            return f"{how}, {pause:.1f} s"

        return strike

    async def received(self, events: Sequence[str]) -> dict[str, str]:
        """Each sink's messages: every event under its delivery id (the correlation id: nothing is
        requeued here), none under another; duplicates counted."""
        found = {
            "nats": [
                h.get("Nats-Msg-Id", "") for _, h, _ in await stream_contents(self.nats.url, self.stream)
            ],
            "rabbitmq": message_ids(await drain(self.rabbit.direct, self.queue)),
            "webhook": [h.get("webhook-id", "") for _, h, _ in self.receiver.requests],
        }
        wanted = set(events)
        report = {}
        for sink, ids in found.items():
            missing = sorted(wanted - set(ids))
            assert not missing, f"{sink}: {len(missing)} events never arrived, e.g. {missing[:5]}"
            strange = sorted(set(ids) - wanted)
            assert not strange, f"{sink}: messages under ids of no row: {strange[:5]}"
            report[sink] = f"{len(ids)} messages, {len(ids) - len(wanted)} duplicates"
        return report


@pytest.fixture
async def brokers() -> AsyncIterator[Brokers]:
    """A nats-server of the test's own with a stream for SUBJECT_PREFIX, a RabbitMQ with an exchange and
    a durable queue (see :func:`rabbit`), and a webhook receiver."""
    nats = EmbeddedNats()
    try:
        nats.start()
        name = await make_stream(nats.url, [f"{SUBJECT_PREFIX}>"])
        async with rabbit() as broker, receiving() as receiver, contextlib.AsyncExitStack() as stack:
            if broker.how.startswith("node"):  # the node is the test's own: no need to delete after
                made = await declare(broker.direct, "chaos", ["ev.#"], "chaos")
            else:
                made = await stack.enter_async_context(topology(broker.direct))
            made_brokers = Brokers(nats, name, broker, made.exchange, made.queue, receiver)
            try:
                yield made_brokers
            finally:
                made_brokers.closed = True
    finally:
        nats.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(BROKER_SOAK_SECONDS + SOAK_SLACK)
async def test_chaos_soak_with_broker_faults_delivers_every_event_to_every_broker(
    env: OutboxEnv,  # noqa: F811
    services: Services,
    servers: tuple[PgServer, RedisServer],  # noqa: F811
    brokers: Brokers,
) -> None:
    """The reservation soak's faults plus NATS and RabbitMQ restarted and the webhook receiver down
    for a while, with events routed to all three beside the reservations: every event row finished
    and in the stream, the queue and the receiver (duplicates only under its own id), every
    reservation settled once, money conserved."""
    pg, redis = servers
    rng = random.Random(SEED)
    load = await prepare_load(env.service_url, int(BROKER_SOAK_SECONDS * RATE), prefix="chaos")
    events = [(f"ev-{i}", EVENT_KIND) for i in range(int(BROKER_SOAK_SECONDS * EVENT_RATE))]
    cli = cli_env(env.env(**SOAK_SETTINGS, **brokers.settings()))
    migrated = run_cli("migrate", env=cli)  # prepares the sinks' tables, as a user does
    assert migrated.returncode == 0, migrated.stderr
    fleet = Fleet(services, cli)
    await fleet.start()
    chaos = Chaos(fleet, env.service_url, pg, redis, rng)
    chaos.strikes.update(brokers.strikes(chaos))

    def choose(i: int) -> str:
        return BROKER_FAULTS[(i - i // 3) % 3] if i % 3 != 2 else rng.choice(FAULTS)

    deadline = time.monotonic() + BROKER_SOAK_SECONDS
    producers = [
        stream(env.service_url, load.rows, deadline),
        stream(env.service_url, events, deadline, UPSERT_EVENTS, EVENT_RATE),
    ]
    await chaos.soak(BROKER_SOAK_SECONDS, producers, choose)
    rows = len(load.rows) + len(events)
    summary = f"{chaos.summary(BROKER_SOAK_SECONDS, rows)}\nrabbitmq: {brokers.rabbit.how}"
    print(summary)
    await chaos.settled(rows, services, summary)
    try:
        outcome = await settle_check(env.service_url, load, [cid for cid, _ in events])
        received = await brokers.received([cid for cid, _ in events])
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{summary}\n{services.tails()}") from None
    print(f"outcome: {dict(outcome)} events={len(events)} {received}")
    assert set(BROKER_FAULTS) <= set(chaos.faults), f"a broker fault never struck: {summary}"
