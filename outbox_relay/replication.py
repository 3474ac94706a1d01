"""Logical replication between the primary and the service database: subscribe and unsubscribe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from outbox_relay.admin import require_shape
from outbox_relay.db import Connection, connect_retrying, quote_ident, quote_literal
from outbox_relay.exceptions import MigrationError, ReplicationError
from outbox_relay.identity import DatabaseIdentity, derived_name, read_identity
from outbox_relay.migrate import check_schema
from outbox_relay.sql import query, render

logger = logging.getLogger(__name__)

#: PostgreSQL's first release with failover slots (``failover``, ``sync_replication_slots``).
FAILOVER_SLOTS_VERSION = 170000


async def subscription_name(configured: str | None, service: Connection, primary: DatabaseIdentity) -> str:
    """The name ``subscribe`` and ``unsubscribe`` use on this service database.

    In order: ``SUBSCRIPTION_NAME`` (``configured``; None: not set); the
    database's existing subscription to the outbox publication (so one made
    under an older default keeps working); a slot recorded by an interrupted
    ``subscribe``; else the derived name.
    """
    if configured:
        return configured
    existing = [r["subname"] for r in await service.fetch(query("outbox_subscriptions"))]
    if len(existing) > 1:
        raise ReplicationError(
            f"this service database has several subscriptions to the outbox publication "
            f"({', '.join(existing)}): set OUTBOX_RELAY_SUBSCRIPTION_NAME to the one to use"
        )
    if existing:
        return str(existing[0])
    recorded = await service.fetch(query("recorded_slots"), primary.system_identifier, primary.database)
    if recorded:
        return str(recorded[0]["slot_name"])
    own = await read_identity(service)
    return derived_name(own.database, own.system_identifier, own.database_oid)


@dataclass(frozen=True)
class SubscribeResult:
    """What `subscribe` did."""

    name: str
    created: bool
    slot_created: bool
    synced: bool
    slot: str = ""
    adopted: bool = False
    #: The slot is a failover slot (PostgreSQL 17+): physical standbys keep a copy of it.
    failover: bool = False


@dataclass(frozen=True)
class ReplicationConfig:
    """What `subscribe` and `unsubscribe` need (URLs and conninfo are secrets: not in ``repr``)."""

    primary_url: str = field(repr=False)
    database_url: str = field(repr=False)
    #: How the service database's server reaches the primary (SUBSCRIPTION_CONNINFO, else PRIMARY_URL).
    conninfo: str = field(repr=False)
    #: SUBSCRIPTION_NAME (None: derived, see :func:`subscription_name`).
    subscription_name: str | None = None


async def subscribe(
    config: ReplicationConfig, *, wait: bool = True, sync_timeout: float = 300.0, adopt_slot: bool = False
) -> SubscribeResult:
    """Create (or re-enable) the subscription of the service database to the primary.

    The slot is made first on the primary, then the subscription uses it
    (``create_slot = false``): CREATE SUBSCRIPTION would otherwise hang when both
    databases live in one cluster. Before the slot is made it is recorded in
    ``outbox_relay.replication_slots``: a slot that exists on the primary but is
    neither recorded there nor this database's subscription's belongs to
    someone else, and is refused (naming it) unless ``adopt_slot``. Rows already
    on the primary are copied; rows the service database already holds are
    skipped by its ``outbox_skip_known`` trigger, so a re-subscription
    duplicates nothing and never stalls.
    """
    async with _locked_pair(config) as (primary, service):
        primary_id = await read_identity(primary)
        name = await subscription_name(config.subscription_name, service, primary_id)
        info = await service.fetchrow(query("subscription_info"), name)
        if info is not None:
            slot = info["subslotname"] or name
            result = await _reenable(service, primary, name, slot, info["subenabled"])
        else:
            result = await _create(service, primary, primary_id, name, config.conninfo, adopt_slot)
        synced = await _wait_for_sync(service, name, sync_timeout) if wait else False
    return replace(result, synced=synced)


@contextlib.asynccontextmanager
async def _locked_pair(config: ReplicationConfig) -> AsyncIterator[tuple[Connection, Connection]]:
    """(primary, service database), both checked, with the service's subscription lock held."""
    primary = await connect_retrying(config.primary_url, what="the primary")
    try:
        service = await connect_retrying(config.database_url, what="the service database")
        try:
            await service.execute(query("subscription_lock"))  # released when `service` closes
            await _check_databases(primary, service)
            yield primary, service
        finally:
            await service.close()
    finally:
        await primary.close()


async def _check_databases(primary: Connection, service: Connection) -> None:
    """Both databases are what they should be: shapes, the primary's publication, the service schema."""
    try:
        await require_shape(primary, "primary", "subscribe")
        await require_shape(service, "service", "subscribe")
    except MigrationError as exc:
        raise ReplicationError(str(exc)) from None
    if not await primary.fetchval(query("publication_exists")):
        raise ReplicationError("the primary has no publication outbox_relay: run `migrate --primary` first")
    try:
        await check_schema(service, "service")
    except MigrationError as exc:
        raise ReplicationError(str(exc)) from None


async def _reenable(
    service: Connection, primary: Connection, name: str, slot: str, enabled: bool
) -> SubscribeResult:
    """The subscription exists: its slot must be on this primary (else it is a failover: `repoint`);
    on 17+ the slot is made a failover slot if it is not one yet; enable it if it is not."""
    state = await primary.fetchrow(query("repoint_slot"), slot)
    if state is None:
        raise ReplicationError(
            f"subscription {name} exists but its slot {slot} is not on the primary at "
            f"OUTBOX_RELAY_PRIMARY_URL (after a failover, or a dropped slot): run `outbox-relay repoint`, "
            f"which re-subscribes copying only what is missing"
        )
    failover = bool(state["failover"])
    if not failover and await _failover_capable(service, primary):
        await _make_failover(service, primary, name, slot, enabled)
        failover, enabled = True, True
    if not enabled:
        await service.execute(_ddl("enable_subscription", name))
        logger.info("subscription re-enabled", extra={"subscription": name})
    return SubscribeResult(
        name=name, created=False, slot_created=False, synced=False, slot=slot, failover=failover
    )


async def _failover_capable(service: Connection, primary: Connection) -> bool:
    """Both servers know failover slots (PostgreSQL 17+: the subscription's ``failover`` option)."""
    versions = [int(await c.fetchval(query("server_version_num"))) for c in (primary, service)]
    return min(versions) >= FAILOVER_SLOTS_VERSION


async def _make_failover(
    service: Connection, primary: Connection, name: str, slot: str, enabled: bool
) -> None:
    """An existing subscription's slot made a failover slot: PostgreSQL alters the slot itself, on a
    disabled subscription whose walsender has let the slot go."""
    if enabled:
        await service.execute(_ddl("disable_subscription", name))
    await _wait_slot_idle(primary, slot, 30.0)
    await service.execute(_ddl("subscription_failover_on", name))
    await service.execute(_ddl("enable_subscription", name))
    logger.info("subscription slot made a failover slot", extra={"subscription": name, "slot": slot})


async def _wait_slot_idle(primary: Connection, slot: str, timeout: float) -> None:
    """Until no walsender holds ``slot`` on the primary (a disabled subscription's goes within moments)."""
    deadline = time.monotonic() + timeout
    while (state := await primary.fetchrow(query("slot_state"), slot)) is not None and state["active"]:
        if time.monotonic() > deadline:
            raise ReplicationError(f"replication slot {slot} stays active on the primary")
        await asyncio.sleep(0.1)


async def _create(
    service: Connection,
    primary: Connection,
    primary_id: DatabaseIdentity,
    name: str,
    conninfo: str,
    adopt: bool,
) -> SubscribeResult:
    """Claim (or make) slot ``name`` on the primary, then the subscription using it.

    On a PostgreSQL 17+ primary the slot is a failover slot (physical standbys
    with ``sync_replication_slots`` keep a copy), and a 17+ service database's
    subscription says ``failover = true`` too: with ``create_slot = false``,
    CREATE SUBSCRIPTION sets the slot's flag to the subscription's.
    """
    exists, adopted = await _claim_slot(service, primary, primary_id, name, adopt=adopt)
    failover = int(await primary.fetchval(query("server_version_num"))) >= FAILOVER_SLOTS_VERSION
    if not exists:
        # Waits for every open write transaction in the primary's cluster.
        await primary.fetchval(query("create_failover_slot" if failover else "create_slot"), name)
    option = failover and await _failover_capable(service, primary)
    await service.execute(
        render(
            query("create_subscription"),
            subscription=quote_ident(name),
            conninfo=quote_literal(conninfo),
            slot=quote_literal(name),
            options=", failover = true" if option else "",
        )
    )
    state = await primary.fetchrow(query("repoint_slot"), name)
    failover = state is not None and bool(state["failover"])
    logger.info(
        "subscription created",
        extra={"subscription": name, "slot": name, "adopted": adopted, "failover": failover},
    )
    return SubscribeResult(
        name=name,
        created=True,
        slot_created=not exists,
        synced=False,
        slot=name,
        adopted=adopted,
        failover=failover,
    )


async def _claim_slot(
    service: Connection, primary: Connection, primary_id: DatabaseIdentity, name: str, *, adopt: bool
) -> tuple[bool, bool]:
    """Make slot ``name`` this database's before it is created or used.

    Returns (the slot exists already, it was another's and is adopted).

    A slot that exists already is ours only when recorded here (an interrupted
    run) and idle; otherwise another subscription uses it and it is refused,
    unless ``adopt``.
    """
    recorded = name in await _recorded(service, primary_id)
    state = await primary.fetchrow(query("slot_state"), name)
    if state is not None and not adopt:
        if not recorded:
            raise ReplicationError(
                f"replication slot {name} already exists on the primary and is not this service "
                f"database's: another subscription uses it. Set OUTBOX_RELAY_SUBSCRIPTION_NAME to "
                f"another name, or pass --adopt-slot to take this slot over on purpose"
            )
        if state["active"]:
            raise ReplicationError(
                f"replication slot {name} on the primary is in use by another subscriber; "
                f"pass --adopt-slot to take it over on purpose"
            )
    # Recorded (and committed) before the slot is made: a crash in between leaves a trace.
    await service.execute(query("record_slot"), primary_id.system_identifier, primary_id.database, name)
    adopted = state is not None and not recorded
    if adopted:
        logger.warning("adopting an existing replication slot", extra={"slot": name})
    return state is not None, adopted


async def _recorded(service: Connection, primary_id: DatabaseIdentity) -> set[str]:
    """The slots on this primary that this service database made or adopted."""
    rows = await service.fetch(query("recorded_slots"), primary_id.system_identifier, primary_id.database)
    return {str(r["slot_name"]) for r in rows}


async def _wait_for_sync(service: Connection, name: str, timeout: float) -> bool:
    """Wait until the initial copy of every subscribed table is done (state 'r')."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [r["srsubstate"] for r in await service.fetch(query("subscription_table_states"), name)]
        if states and all(state == "r" for state in states):
            return True
        await asyncio.sleep(0.1)
    raise ReplicationError(
        f"subscription {name} made, but the initial copy did not finish within {timeout:.0f} s"
    )


@dataclass(frozen=True)
class UnsubscribeResult:
    """What `unsubscribe` did."""

    name: str
    subscription_dropped: bool
    slot_dropped: bool


async def unsubscribe(config: ReplicationConfig, *, slot_timeout: float = 30.0) -> UnsubscribeResult:
    """Drop the subscription, then its slot on the primary; either may already be gone.

    Only a slot this database's subscription used, or one recorded in
    ``outbox_relay.replication_slots``, is dropped: never a slot of another
    subscription that happens to have the same name.
    """
    primary = await connect_retrying(config.primary_url, what="the primary")
    try:
        primary_id = await read_identity(primary)
        service = await connect_retrying(config.database_url, what="the service database")
        try:
            await service.execute(query("subscription_lock"))  # released when `service` closes
            name = await subscription_name(config.subscription_name, service, primary_id)
            info = await service.fetchrow(query("subscription_info"), name)
            recorded = await _recorded(service, primary_id)
            slot: str | None = name if name in recorded else None
            if info is not None:
                slot = info["subslotname"] or slot
                if slot is not None:
                    # Remembered first: a crash after the DROP still lets a re-run drop the slot.
                    await service.execute(
                        query("record_slot"), primary_id.system_identifier, primary_id.database, slot
                    )
                await service.execute(_ddl("disable_subscription", name))
                await service.execute(_ddl("detach_subscription_slot", name))
                await service.execute(_ddl("drop_subscription", name))
                logger.info("subscription dropped", extra={"subscription": name})
            elif await primary.fetchval(query("slot_exists"), name) and slot is None:
                logger.warning(
                    "replication slot left alone: this service database did not make it",
                    extra={"slot": name},
                )
            slot_dropped = False
            if slot is not None:
                slot_dropped = await _drop_slot(primary, slot, slot_timeout)
                await service.execute(query("forget_slot"), primary_id.system_identifier, slot)
        finally:
            await service.close()
    finally:
        await primary.close()
    return UnsubscribeResult(name=name, subscription_dropped=info is not None, slot_dropped=slot_dropped)


async def _drop_slot(primary: Connection, name: str, timeout: float) -> bool:
    """Drop slot ``name`` once it is idle; False when it was not there."""
    deadline = time.monotonic() + timeout
    while await primary.fetchval(query("slot_exists"), name):
        # The walsender of the disabled subscription exits within moments.
        if await primary.fetchval(query("drop_slot"), name) is not None or not await primary.fetchval(
            query("slot_exists"), name
        ):
            logger.info("replication slot dropped", extra={"slot": name})
            return True
        if time.monotonic() > deadline:
            raise ReplicationError(f"replication slot {name} stays active on the primary")
        await asyncio.sleep(0.1)
    return False


@dataclass(frozen=True)
class RepointResult:
    """What `repoint` did: adopted the slot the new primary kept (``adopted``), or re-subscribed."""

    name: str
    slot: str
    #: "adopted": the slot on the new primary is used (a synced one after a 17+ failover);
    #: "resubscribed": a new slot and subscription, copying only what is missing;
    #: "subscribed": there was no subscription, made as `subscribe` does.
    how: Literal["adopted", "resubscribed", "subscribed"]
    synced_slot: bool = False
    failover: bool = False
    #: The LSN the new primary resends from (adopted only).
    resume_lsn: str | None = None
    copied: bool = False


async def repoint(
    config: ReplicationConfig, *, wait: bool = True, sync_timeout: float = 300.0
) -> RepointResult:
    """Point the subscription at the primary now at PRIMARY_URL (the promoted standby after a failover).

    The slot the new primary holds under the subscription's slot name, when it
    is usable and this database's (recorded here, or synced from the old
    primary by PostgreSQL 17+), is adopted: the connection is changed and the
    subscription resumes from the slot's ``confirmed_flush_lsn``. Otherwise the
    subscription is made again on a new slot, copying the table: rows the
    service database holds are skipped (``outbox_skip_known``). Either way
    nothing committed on the new primary is lost, and no row is applied twice.
    """
    async with _locked_pair(config) as (primary, service):
        if await primary.fetchval(query("in_recovery")):
            raise ReplicationError(
                "the server at OUTBOX_RELAY_PRIMARY_URL is a standby (in recovery): promote it first "
                "(pg_ctl promote, or SELECT pg_promote();), then run `repoint` again"
            )
        primary_id = await read_identity(primary)
        name = await subscription_name(config.subscription_name, service, primary_id)
        result = await _repoint(service, primary, primary_id, name, config.conninfo)
        if wait and result.copied:
            await _wait_for_sync(service, name, sync_timeout)
    return result


async def _repoint(
    service: Connection, primary: Connection, primary_id: DatabaseIdentity, name: str, conninfo: str
) -> RepointResult:
    """Adopt the new primary's slot, or re-subscribe (see :func:`repoint`)."""
    info = await service.fetchrow(query("subscription_info"), name)
    if info is None:
        made = await _create(service, primary, primary_id, name, conninfo, adopt=False)
        return RepointResult(name, made.slot, "subscribed", failover=made.failover, copied=True)
    slot = str(info["subslotname"] or name)
    state = await primary.fetchrow(query("repoint_slot"), slot)
    ours = state is not None and (state["synced"] or slot in await _recorded(service, primary_id))
    if state is not None and state["active"]:
        raise ReplicationError(
            f"replication slot {slot} on the new primary is in use by another subscriber: "
            f"set OUTBOX_RELAY_SUBSCRIPTION_NAME to another name, or drop that subscriber"
        )
    if state is not None and not ours:
        raise ReplicationError(
            f"replication slot {slot} exists on the new primary and is not this service database's: "
            f"set OUTBOX_RELAY_SUBSCRIPTION_NAME to another name"
        )
    usable = (
        state is not None
        and state["database"] == primary_id.database
        and state["plugin"] == "pgoutput"
        and state["wal_status"] != "lost"
        and state["invalid"] is None
        and state["confirmed_flush_lsn"] is not None
    )
    if state is not None and usable:
        return await _adopt(service, primary_id, name, slot, conninfo, state)
    if state is not None:  # ours, but unusable (invalidated, lost): made again below
        logger.warning("dropping an unusable replication slot", extra={"slot": slot, "why": state["invalid"]})
        await _drop_slot(primary, slot, 30.0)
    await _drop_subscription(service, name)
    made = await _create(service, primary, primary_id, name, conninfo, adopt=False)
    logger.info("re-subscribed to the new primary", extra={"subscription": name, "slot": made.slot})
    return RepointResult(name, made.slot, "resubscribed", failover=made.failover, copied=True)


async def _adopt(
    service: Connection, primary_id: DatabaseIdentity, name: str, slot: str, conninfo: str, state: Any
) -> RepointResult:
    """The subscription, disabled, takes the new primary's connection and resumes from the slot's
    confirmed_flush_lsn (its origin moved there: nothing the new primary committed is skipped)."""
    oid = int(await service.fetchval(query("subscription_oid"), name))
    await service.execute(_ddl("disable_subscription", name))
    deadline = time.monotonic() + 30.0
    while await service.fetchval(query("apply_workers"), oid):
        if time.monotonic() > deadline:
            raise ReplicationError(f"subscription {name}'s apply worker does not stop")
        await asyncio.sleep(0.1)
    await service.execute(
        render(
            query("alter_subscription_connection"),
            subscription=quote_ident(name),
            conninfo=quote_literal(conninfo),
        )
    )
    resume = str(state["confirmed_flush_lsn"])
    await service.execute(query("origin_advance"), oid, resume)
    await service.execute(query("record_slot"), primary_id.system_identifier, primary_id.database, slot)
    await service.execute(_ddl("enable_subscription", name))
    logger.info(
        "subscription repointed: slot adopted",
        extra={"subscription": name, "slot": slot, "synced": bool(state["synced"]), "resume_lsn": resume},
    )
    return RepointResult(
        name,
        slot,
        "adopted",
        synced_slot=bool(state["synced"]),
        failover=bool(state["failover"]),
        resume_lsn=resume,
    )


async def _drop_subscription(service: Connection, name: str) -> None:
    """Drop the subscription, leaving its slot alone (it is on the old primary, gone or unreachable)."""
    await service.execute(_ddl("disable_subscription", name))
    await service.execute(_ddl("detach_subscription_slot", name))
    await service.execute(_ddl("drop_subscription", name))
    logger.info("subscription dropped, to be made again on the new primary", extra={"subscription": name})


def _ddl(name: str, subscription: str) -> str:
    return render(query(name), subscription=quote_ident(subscription))
