"""Logical replication between the primary and the service database: subscribe and unsubscribe."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

from outbox_relay.admin import require_shape
from outbox_relay.db import Connection, connect_retrying, quote_ident, quote_literal
from outbox_relay.exceptions import MigrationError, ReplicationError
from outbox_relay.identity import DatabaseIdentity, derived_name, read_identity
from outbox_relay.migrate import check_schema
from outbox_relay.sql import query, render

logger = logging.getLogger(__name__)


def derived_subscription_name(database: str, system_identifier: str, database_oid: int) -> str:
    """The default subscription and slot name of a service database (the default queue name too,
    see :func:`outbox_relay.identity.derived_name`)."""
    return derived_name(database, system_identifier, database_oid)


_Identity = DatabaseIdentity
_identity = read_identity


async def subscription_name(configured: str | None, service: Connection, primary: _Identity) -> str:
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
    own = await _identity(service)
    return derived_subscription_name(own.database, own.system_identifier, own.database_oid)


@dataclass(frozen=True)
class SubscribeResult:
    """What `subscribe` did."""

    name: str
    created: bool
    slot_created: bool
    synced: bool
    slot: str = ""
    adopted: bool = False


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
    primary = await connect_retrying(config.primary_url, what="the primary")
    try:
        service = await connect_retrying(config.database_url, what="the service database")
        try:
            await service.execute(query("subscription_lock"))  # released when `service` closes
            await _check_databases(primary, service)
            primary_id = await _identity(primary)
            name = await subscription_name(config.subscription_name, service, primary_id)
            info = await service.fetchrow(query("subscription_info"), name)
            if info is not None:
                result = await _reenable(service, name, info["subslotname"] or name, info["subenabled"])
            else:
                result = await _create(service, primary, primary_id, name, config.conninfo, adopt_slot)
            synced = await _wait_for_sync(service, name, sync_timeout) if wait else False
        finally:
            await service.close()
    finally:
        await primary.close()
    return replace(result, synced=synced)


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


async def _reenable(service: Connection, name: str, slot: str, enabled: bool) -> SubscribeResult:
    """The subscription exists: enable it if it is not."""
    if not enabled:
        await service.execute(_ddl("enable_subscription", name))
        logger.info("subscription re-enabled", extra={"subscription": name})
    return SubscribeResult(name=name, created=False, slot_created=False, synced=False, slot=slot)


async def _create(
    service: Connection, primary: Connection, primary_id: _Identity, name: str, conninfo: str, adopt: bool
) -> SubscribeResult:
    """Claim (or make) slot ``name`` on the primary, then the subscription using it."""
    exists, adopted = await _claim_slot(service, primary, primary_id, name, adopt=adopt)
    if not exists:
        # Waits for every open write transaction in the primary's cluster.
        await primary.fetchval(query("create_slot"), name)
    await service.execute(
        render(
            query("create_subscription"),
            subscription=quote_ident(name),
            conninfo=quote_literal(conninfo),
            slot=quote_literal(name),
        )
    )
    logger.info("subscription created", extra={"subscription": name, "slot": name, "adopted": adopted})
    return SubscribeResult(
        name=name, created=True, slot_created=not exists, synced=False, slot=name, adopted=adopted
    )


async def _claim_slot(
    service: Connection, primary: Connection, primary_id: _Identity, name: str, *, adopt: bool
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


async def _recorded(service: Connection, primary_id: _Identity) -> set[str]:
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
        primary_id = await _identity(primary)
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


def _ddl(name: str, subscription: str) -> str:
    return render(query(name), subscription=quote_ident(subscription))
