"""Logical replication between the primary and the service database: subscribe and unsubscribe."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from outbox_relay.db import Connection, connect_retrying, quote_ident, quote_literal
from outbox_relay.exceptions import MigrationError, ReplicationError
from outbox_relay.migrate import check_schema
from outbox_relay.settings import Settings
from outbox_relay.sql import query, render

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubscribeResult:
    """What `subscribe` did."""

    name: str
    created: bool
    slot_created: bool
    synced: bool


async def subscribe(settings: Settings, *, wait: bool = True, sync_timeout: float = 300.0) -> SubscribeResult:
    """Create (or re-enable) the subscription of the service database to the primary.

    The slot is made first on the primary, then the subscription uses it
    (``create_slot = false``): CREATE SUBSCRIPTION would otherwise hang when both
    databases live in one cluster. Rows already on the primary are copied; rows
    the service database already holds are skipped by its ``outbox_skip_known``
    trigger, so a re-subscription duplicates nothing and never stalls.
    """
    name = settings.effective_subscription_name()
    conninfo = (
        settings.subscription_conninfo.get_secret_value()
        if settings.subscription_conninfo is not None
        else settings.require_primary_url()
    )
    primary = await connect_retrying(settings.require_primary_url(), what="the primary")
    try:
        service = await connect_retrying(settings.require_database_url(), what="the service database")
        try:
            await service.execute(query("subscription_lock"))  # released when `service` closes
            if not await primary.fetchval(query("publication_exists")):
                raise ReplicationError(
                    "the primary has no publication outbox_relay: run `migrate --primary` first"
                )
            try:
                await check_schema(service, "service")
            except MigrationError as exc:
                raise ReplicationError(str(exc)) from None
            info = await service.fetchrow(query("subscription_info"), name)
            slot_created = False
            if info is not None:
                if not info["subenabled"]:
                    await service.execute(_ddl("enable_subscription", name))
                    logger.info("subscription re-enabled", extra={"subscription": name})
                created = False
            else:
                if not await primary.fetchval(query("slot_exists"), name):
                    # Waits for every open write transaction in the primary's cluster.
                    await primary.fetchval(query("create_slot"), name)
                    slot_created = True
                await service.execute(
                    render(
                        query("create_subscription"),
                        subscription=quote_ident(name),
                        conninfo=quote_literal(conninfo),
                        slot=quote_literal(name),
                    )
                )
                created = True
                logger.info("subscription created", extra={"subscription": name, "slot": name})
            synced = await _wait_for_sync(service, name, sync_timeout) if wait else False
        finally:
            await service.close()
    finally:
        await primary.close()
    return SubscribeResult(name=name, created=created, slot_created=slot_created, synced=synced)


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


async def unsubscribe(settings: Settings, *, slot_timeout: float = 30.0) -> UnsubscribeResult:
    """Drop the subscription, then its slot on the primary; either may already be gone."""
    name = settings.effective_subscription_name()
    primary_url = settings.require_primary_url()
    service = await connect_retrying(settings.require_database_url(), what="the service database")
    try:
        await service.execute(query("subscription_lock"))  # released when `service` closes
        info = await service.fetchrow(query("subscription_info"), name)
        if info is not None:
            await service.execute(_ddl("disable_subscription", name))
            await service.execute(_ddl("detach_subscription_slot", name))
            await service.execute(_ddl("drop_subscription", name))
            logger.info("subscription dropped", extra={"subscription": name})
    finally:
        await service.close()

    primary = await connect_retrying(primary_url, what="the primary")
    slot_dropped = False
    try:
        deadline = time.monotonic() + slot_timeout
        while await primary.fetchval(query("slot_exists"), name):
            # The walsender of the disabled subscription exits within moments.
            if await primary.fetchval(query("drop_slot"), name) is not None or not await primary.fetchval(
                query("slot_exists"), name
            ):
                slot_dropped = True
                logger.info("replication slot dropped", extra={"slot": name})
                break
            if time.monotonic() > deadline:
                raise ReplicationError(f"replication slot {name} stays active on the primary")
            await asyncio.sleep(0.1)
    finally:
        await primary.close()
    return UnsubscribeResult(name=name, subscription_dropped=info is not None, slot_dropped=slot_dropped)


def _ddl(name: str, subscription: str) -> str:
    return render(query(name), subscription=quote_ident(subscription))
