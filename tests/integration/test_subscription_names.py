"""Default subscription names are unique per service database; slots are never shared (issue 7, item 4)."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from outbox_relay.composition import replication_config
from outbox_relay.db import quote_ident
from outbox_relay.exceptions import ReplicationError
from outbox_relay.migrate import migrate
from outbox_relay.replication import subscribe, unsubscribe
from outbox_relay.settings import Settings
from tests.helpers import produce, wait_until
from tests.servers import PgServer

Factory = Callable[[str], Awaitable[str]]
IDLE_SLOTS = "SELECT count(*) = 0 FROM pg_replication_slots WHERE database = $1 AND active"


@pytest.fixture
async def cluster(pg_server: PgServer) -> AsyncIterator[tuple[str, Factory]]:
    """A migrated primary, and a factory of migrated service databases; all dropped after the test."""
    admin = await asyncpg.connect(pg_server.url("postgres"))
    suffix = uuid.uuid4().hex[:8]
    primary_db = f"prim_{suffix}"
    made: list[str] = []

    async def create(name: str, target: str) -> str:
        await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
        made.append(name)
        conn = await asyncpg.connect(pg_server.url(name))
        try:
            await migrate(conn, target)  # type: ignore[arg-type]
        finally:
            await conn.close()
        return pg_server.url(name)

    primary_url = await create(primary_db, "primary")

    async def service(name: str) -> str:
        return await create(f"{name}-{suffix}" if "-" in name else f"{name}_{suffix}", "service")

    try:
        yield primary_url, service
    finally:
        for name in made[1:]:
            with contextlib.suppress(Exception):
                conn = await asyncpg.connect(pg_server.url(name))
                try:
                    for sub in await conn.fetch(
                        "SELECT subname FROM pg_subscription s JOIN pg_database d "
                        "ON d.oid = s.subdbid WHERE d.datname = current_database()"
                    ):
                        ident = quote_ident(sub["subname"])
                        await conn.execute(f"ALTER SUBSCRIPTION {ident} DISABLE")
                        await conn.execute(f"ALTER SUBSCRIPTION {ident} SET (slot_name = NONE)")
                        await conn.execute(f"DROP SUBSCRIPTION {ident}")
                finally:
                    await conn.close()
        with contextlib.suppress(Exception):
            await wait_until(
                lambda: admin.fetchval(IDLE_SLOTS, primary_db),
                timeout=10,
            )
            await admin.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
                primary_db,
            )
        for name in reversed(made):
            with contextlib.suppress(Exception):
                await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        await admin.close()


def _settings(service_url: str, primary_url: str, **extra: Any) -> Settings:
    return Settings(database_url=service_url, primary_url=primary_url, **extra)


async def _slots(primary_url: str) -> set[str]:
    """The subscriptions' slots on the primary; not the short-lived slots of a table's initial
    copy (``pg_<subscription oid>_sync_<table oid>_<system id>``, present while a copy runs)."""
    conn = await asyncpg.connect(primary_url)
    try:
        rows = await conn.fetch(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
            r" AND slot_name !~ '^pg_\d+_sync_\d+_\d+$'"
        )
        return {r["slot_name"] for r in rows}
    finally:
        await conn.close()


async def _subscription(service_url: str) -> tuple[str, str] | None:
    conn = await asyncpg.connect(service_url)
    try:
        row = await conn.fetchrow(
            "SELECT subname, subslotname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
            "WHERE d.datname = current_database()"
        )
        return None if row is None else (row["subname"], row["subslotname"])
    finally:
        await conn.close()


async def _replicated(service_url: str, correlation_id: str) -> bool:
    conn = await asyncpg.connect(service_url)
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) > 0 FROM outbox_relay.outbox WHERE correlation_id = $1", correlation_id
            )
        )
    finally:
        await conn.close()


async def _produce(primary_url: str, correlation_id: str) -> None:
    conn = await asyncpg.connect(primary_url)
    try:
        await produce(conn, correlation_id)
    finally:
        await conn.close()


async def test_svc_dash_a_and_svc_underscore_a_get_their_own_subscriptions_and_slots(
    cluster: tuple[str, Factory],
) -> None:
    """svc-a and svc_a in one cluster derive different names, two slots, and both receive every row."""
    primary_url, service = cluster
    dash, underscore = await service("svc-a"), await service("svc_a")

    first = await subscribe(replication_config(_settings(dash, primary_url)))
    second = await subscribe(replication_config(_settings(underscore, primary_url)))

    assert first.name != second.name
    assert first.name.startswith("outbox_relay_svc_a_")
    assert second.name.startswith("outbox_relay_svc_a_")
    assert first.slot_created
    assert second.slot_created, "the second subscribe attached to an existing slot"
    assert await _slots(primary_url) == {first.name, second.name}
    assert await _subscription(dash) == (first.name, first.name)
    assert await _subscription(underscore) == (second.name, second.name)
    await _produce(primary_url, "both-1")
    for url in (dash, underscore):
        await wait_until(functools.partial(_replicated, url, "both-1"), timeout=30, message="row replicated")


async def test_upper_and_lower_case_names_differ(cluster: tuple[str, Factory]) -> None:
    """App and app (case only) in one cluster derive different subscription names."""
    primary_url, service = cluster
    upper, lower = await service("App"), await service("app")
    first = await subscribe(replication_config(_settings(upper, primary_url)), wait=False)
    second = await subscribe(replication_config(_settings(lower, primary_url)), wait=False)
    assert first.name != second.name
    assert await _slots(primary_url) == {first.name, second.name}


async def test_an_explicit_name_that_collides_is_refused_naming_the_slot(
    cluster: tuple[str, Factory],
) -> None:
    """A second service configured with the first one's name is refused, the slot named, nothing made."""
    primary_url, service = cluster
    first_url, second_url = await service("one"), await service("two")
    first = await subscribe(replication_config(_settings(first_url, primary_url)))

    with pytest.raises(ReplicationError, match=first.name) as caught:
        await subscribe(replication_config(_settings(second_url, primary_url, subscription_name=first.name)))
    assert "--adopt-slot" in str(caught.value)
    assert await _subscription(second_url) is None
    assert await _slots(primary_url) == {first.name}


async def test_rerunning_subscribe_is_a_no_op(cluster: tuple[str, Factory]) -> None:
    """A second and third subscribe create nothing: same name, one subscription, one slot."""
    primary_url, service = cluster
    url = await service("again")
    settings = _settings(url, primary_url)
    first = await subscribe(replication_config(settings))
    for _ in range(2):
        again = await subscribe(replication_config(settings))
        assert again.name == first.name
        assert not again.created
        assert not again.slot_created
    assert await _slots(primary_url) == {first.name}
    assert await _subscription(url) == (first.name, first.name)


async def test_rerun_after_a_crash_between_slot_and_subscription_uses_its_own_slot(
    cluster: tuple[str, Factory],
) -> None:
    """A slot recorded by this database (made, then the run died) is taken up by the re-run, not refused."""
    primary_url, service = cluster
    url = await service("crashed")
    settings = _settings(url, primary_url)
    first = await subscribe(replication_config(settings))
    # Undo only the subscription, as if the run had died right after creating the slot.
    conn = await asyncpg.connect(url)
    try:
        ident = quote_ident(first.name)
        await conn.execute(f"ALTER SUBSCRIPTION {ident} DISABLE")
        await conn.execute(f"ALTER SUBSCRIPTION {ident} SET (slot_name = NONE)")
        await conn.execute(f"DROP SUBSCRIPTION {ident}")
    finally:
        await conn.close()
    assert await _slots(primary_url) == {first.name}

    again = await subscribe(replication_config(settings))
    assert again.name == first.name
    assert again.created
    assert not again.slot_created
    assert not again.adopted
    await _produce(primary_url, "after-crash")
    await wait_until(lambda: _replicated(url, "after-crash"), timeout=30, message="row replicated")


async def test_unsubscribe_of_one_never_drops_the_others_slot(cluster: tuple[str, Factory]) -> None:
    """unsubscribe on a service configured with another's name, or on a neighbour, leaves that slot alone."""
    primary_url, service = cluster
    first_url, second_url = await service("keep"), await service("other")
    first = await subscribe(replication_config(_settings(first_url, primary_url)))
    second = await subscribe(replication_config(_settings(second_url, primary_url)))

    colliding = await unsubscribe(
        replication_config(_settings(second_url, primary_url, subscription_name=first.name))
    )
    assert not colliding.subscription_dropped
    assert not colliding.slot_dropped
    assert first.name in await _slots(primary_url)

    dropped = await unsubscribe(replication_config(_settings(second_url, primary_url)))
    assert dropped.name == second.name
    assert dropped.subscription_dropped
    assert dropped.slot_dropped
    assert await _slots(primary_url) == {first.name}
    await _produce(primary_url, "still-flowing")
    await wait_until(lambda: _replicated(first_url, "still-flowing"), timeout=30, message="first replicates")


async def test_adopt_slot_takes_an_idle_foreign_slot_on_purpose(cluster: tuple[str, Factory]) -> None:
    """With adopt_slot a slot this database did not make is used, and its unsubscribe then drops it."""
    primary_url, service = cluster
    url = await service("adopter")
    conn = await asyncpg.connect(primary_url)
    try:
        await conn.execute("SELECT pg_create_logical_replication_slot('handmade_slot', 'pgoutput')")
    finally:
        await conn.close()
    settings = _settings(url, primary_url, subscription_name="handmade_slot")
    with pytest.raises(ReplicationError, match="handmade_slot"):
        await subscribe(replication_config(settings))
    adopted = await subscribe(replication_config(settings), adopt_slot=True)
    assert adopted.created
    assert adopted.adopted
    gone = await unsubscribe(replication_config(settings))
    assert gone.slot_dropped
    assert await _slots(primary_url) == set()


async def test_a_subscription_made_under_the_old_default_name_keeps_working(
    cluster: tuple[str, Factory],
) -> None:
    """A service database subscribed as outbox_relay_<db> (the old default) keeps that subscription."""
    primary_url, service = cluster
    url = await service("legacy")
    database = url.rsplit("/", 1)[1]
    legacy = f"outbox_relay_{database}"
    primary = await asyncpg.connect(primary_url)
    try:
        await primary.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", legacy)
    finally:
        await primary.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"CREATE SUBSCRIPTION {quote_ident(legacy)} CONNECTION '{primary_url}' "
            f"PUBLICATION outbox_relay WITH (create_slot = false, slot_name = '{legacy}', enabled = false)"
        )
    finally:
        await conn.close()

    result = await subscribe(replication_config(_settings(url, primary_url)))
    assert result.name == legacy
    assert not result.created
    assert await _subscription(url) == (legacy, legacy)
    await _produce(primary_url, "legacy-1")
    await wait_until(lambda: _replicated(url, "legacy-1"), timeout=30, message="legacy subscription runs")

    gone = await unsubscribe(replication_config(_settings(url, primary_url)))
    assert gone.name == legacy
    assert gone.subscription_dropped
    assert gone.slot_dropped
    assert await _slots(primary_url) == set()
