"""The set-up `demo`, `demo --sink nats` and the bench share: migrate both sides, then subscribe."""

from __future__ import annotations

from collections.abc import Sequence

from outbox_relay.composition import replication_config
from outbox_relay.db import connect
from outbox_relay.handlers import HandlerRegistry, Plugin, load_plugins
from outbox_relay.migrate import Target, migrate
from outbox_relay.replication import SubscribeResult, subscribe
from outbox_relay.settings import Settings


async def migrate_database(url: str, target: Target, plugins: Sequence[Plugin]) -> None:
    """Migrate one database (``target``: service or primary) over a connection of its own."""
    conn = await connect(url)
    try:
        await migrate(conn, target, plugins)
    finally:
        await conn.close()


async def prepare(
    settings: Settings, plugins: Sequence[Plugin] | None = None, *, replicate: bool = True
) -> SubscribeResult | None:
    """Migrate the service database (with ``plugins``; by default every installed one, as `migrate`
    does: a worker checks the schema of each, the sinks' set included, whatever ROUTES says) and,
    when ``replicate`` and the settings name a primary, the primary too, then subscribe the
    service database to it; the subscription made, or None where nothing replicates."""
    if plugins is None:
        plugins = load_plugins(HandlerRegistry()).plugins()
    await migrate_database(settings.require_database_url(), "service", plugins)
    if not (replicate and settings.primary_url is not None):
        return None
    await migrate_database(settings.require_primary_url(), "primary", plugins)
    return await subscribe(replication_config(settings))
