"""Sinks: handlers that deliver an event to another system and finish the row once it has acknowledged.

Each sink is a plugin of its own (``nats``, ``webhook``: a :class:`SinkPlugin`
published under the ``outbox_relay.plugins`` entry-point group, like the
reservation domain). An installed sink does nothing until ``OUTBOX_RELAY_ROUTES``
names it: :func:`enable_routes`, called once at the edge, builds the sinks the
routes name, adds one registry route per entry (a kind with a handler of its
own keeps it), and adds the plugin ``sinks`` that brings the ``deliveries``
table (its own migration set) and opens the sinks' connections once per worker
process (its lifespan).

One attempt makes one delivery per sink, all at once. On a route with several
sinks each acknowledgement is recorded in ``outbox_relay_sinks.deliveries``:
when every sink acknowledged, in the transaction that finishes the row; when
some did not, at once from a connection of its own (the row's transaction then
rolls back), so that the retry delivers only to the sinks that have not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from outbox_relay.config import SettingsBase
from outbox_relay.db import Connection, Pool, create_pool
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import (
    OutboxRelayError,
    PermanentError,
    PluginError,
    SettingsError,
    TransientError,
)
from outbox_relay.handlers import Handler, HandlerRegistry, Plugin
from outbox_relay.logs import describe
from outbox_relay.sinks.routes import Route, sinks_named
from outbox_relay.sql import QueryFile

logger = logging.getLogger(__name__)

query = QueryFile(Path(__file__).resolve().parent / "queries.sql")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The plugin that :func:`enable_routes` adds: the deliveries table and the sinks' lifespan.
ROUTES_PLUGIN = "sinks"

S = TypeVar("S", bound=SettingsBase)


class Sink(Protocol):
    """Delivers one event to one system; raises :class:`PermanentError` or :class:`TransientError`."""

    @property
    def name(self) -> str: ...

    def lifespan(self) -> AbstractAsyncContextManager[object]:
        """Open the sink's long-lived connections for one worker process; close them on exit."""
        ...

    async def deliver(self, event: OutboxEvent, body: bytes, delivery_id: str) -> None:
        """Deliver ``body`` (the event JSON) and return once the system has acknowledged it."""
        ...


@dataclass(frozen=True)
class SinkContext:
    """What a sink is built from: the routes that name it, its plugin's own settings (read at the
    edge), the service database (for bookkeeping) and how many jobs a worker runs at once."""

    routes: tuple[Route, ...]
    database_url: str = field(repr=False)
    concurrency: int
    settings: SettingsBase | None = None

    def own_settings(self, cls: type[S]) -> S:
        """The plugin's settings as ``cls`` (what the plugin declared)."""
        if not isinstance(self.settings, cls):
            raise PluginError(f"the sink's settings were not read as {cls.__name__}")
        return self.settings


@dataclass(frozen=True)
class Routing:
    """ROUTES and what every sink of a worker shares, as the edge hands them to :func:`enable_routes`."""

    routes: tuple[Route, ...]
    database_url: str = field(repr=False)
    concurrency: int


@dataclass(frozen=True)
class SinkPlugin(Plugin):
    """A sink as a plugin: ``make`` builds the sink from its :class:`SinkContext` when a route names it."""

    make: Callable[[SinkContext], Sink] = field(kw_only=True)


def event_json(event: OutboxEvent) -> bytes:
    """The event a sink delivers: ``{"correlation_id", "kind", "outcome", "payload", "created_at"}``."""
    return json.dumps(
        {
            "correlation_id": event.correlation_id,
            "kind": event.kind,
            "outcome": event.outcome,
            "payload": event.payload,
            "created_at": event.created_at.isoformat(),
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def delivery_id(event: OutboxEvent) -> str:
    """The id receivers deduplicate on: the correlation id, ``<id>#<n>`` after the n-th requeue."""
    return event.correlation_id if event.generation == 0 else f"{event.correlation_id}#{event.generation}"


class SinkRouter:
    """The handlers of the routes, and the connections they share in one worker process."""

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._sinks: dict[str, Sink] = {}
        self._progress: Pool | None = None

    def add_sink(self, sink: Sink) -> None:
        """Use ``sink`` (opened by :meth:`lifespan`)."""
        self._sinks[sink.name] = sink

    def handler(self, names: Sequence[str]) -> Handler:
        """The handler that delivers to the sinks ``names``."""
        sinks = tuple(self._sinks[name] for name in names)
        if len(sinks) == 1:
            return _single(sinks[0])

        async def deliver_to_all(conn: Connection, event: OutboxEvent) -> None:
            await self._deliver_to_all(conn, event, sinks)

        return deliver_to_all

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open every sink (and the small pool that records partial deliveries); close them after."""
        async with AsyncExitStack() as stack:
            for sink in self._sinks.values():
                await stack.enter_async_context(sink.lifespan())
            self._progress = await create_pool(
                self._database_url, max_size=2, application_name="outbox_relay.sinks"
            )
            try:
                yield
            finally:
                pool, self._progress = self._progress, None
                try:
                    await asyncio.wait_for(pool.close(), 5.0)
                except Exception:
                    pool.terminate()

    async def _deliver_to_all(self, conn: Connection, event: OutboxEvent, sinks: tuple[Sink, ...]) -> None:
        done = {r["sink"] for r in await conn.fetch(query("delivered_sinks"), event.id)}
        pending = [sink for sink in sinks if sink.name not in done]
        body, did = event_json(event), delivery_id(event)
        results = await asyncio.gather(
            *(sink.deliver(event, body, did) for sink in pending), return_exceptions=True
        )
        delivered = [sink.name for sink, result in zip(pending, results, strict=True) if result is None]
        failed = [
            (sink.name, result)
            for sink, result in zip(pending, results, strict=True)
            if isinstance(result, BaseException)
        ]
        if not failed:
            await conn.execute(query("record_deliveries"), event.id, delivered)
            return
        for _, result in failed:
            if not isinstance(result, Exception):  # CancelledError and the like: not ours to keep
                raise result
        if delivered:
            await self._record_partial(event, delivered)
        raise _combined(failed)

    async def _record_partial(self, event: OutboxEvent, delivered: list[str]) -> None:
        """Record the sinks that acknowledged, outside the row's transaction (which rolls back)."""
        if self._progress is None:
            return
        try:
            await self._progress.execute(query("record_deliveries"), event.id, delivered)
        except Exception as exc:  # the retry then delivers to these sinks again: a duplicate, same id
            logger.warning(
                "could not record partial delivery",
                extra={"row_id": event.id, "sinks": ",".join(delivered), "error": describe(exc)},
            )


def _single(sink: Sink) -> Handler:
    async def deliver(conn: Connection, event: OutboxEvent) -> None:
        await sink.deliver(event, event_json(event), delivery_id(event))

    return deliver


def _combined(failed: list[tuple[str, BaseException]]) -> OutboxRelayError:
    """One error for the sinks that failed: permanent if any is, else transient with the longest
    Retry-After."""
    message = "; ".join(
        f"{name}: {exc if isinstance(exc, OutboxRelayError) else describe(exc)}" for name, exc in failed
    )
    if any(isinstance(exc, PermanentError) for _, exc in failed):
        return PermanentError(message)
    waits = [exc.retry_after for _, exc in failed if isinstance(exc, TransientError) and exc.retry_after]
    return TransientError(message, retry_after=max(waits, default=None))


def enable_routes(registry: HandlerRegistry, routing: Routing, *, variable: str = "ROUTES") -> None:
    """Build the sinks ``routing`` names, add its routes to ``registry`` and the ``sinks`` plugin.

    Called once at the edge, after the plugins are loaded and their settings read. An
    unknown sink, or one whose extra is not installed, is a :class:`SettingsError`
    naming ``variable``.
    """
    if not routing.routes:
        return
    available = {p.name: p for p in registry.plugins() if isinstance(p, SinkPlugin)}
    router = SinkRouter(routing.database_url)
    for name in sinks_named(routing.routes):
        plugin = available.get(name)
        if plugin is None:
            known = ", ".join(sorted(available)) or "none"
            raise SettingsError(variable, f"unknown sink {name!r} (installed sinks: {known})")
        context = SinkContext(
            routes=tuple(r for r in routing.routes if name in r.sinks),
            database_url=routing.database_url,
            concurrency=routing.concurrency,
            settings=registry.settings_of(name),
        )
        try:
            router.add_sink(plugin.make(context))
        except ImportError as exc:
            raise SettingsError(
                variable, f"sink {name!r} needs the extra outbox-relay[{name}] ({exc.name} is missing)"
            ) from None
    for route in routing.routes:
        registry.route(route.pattern, router.handler(route.sinks))
    try:
        registry.add_plugin(
            Plugin(ROUTES_PLUGIN, handlers={}, migrations=MIGRATIONS, lifespan=router.lifespan)
        )
    except PluginError as exc:
        raise SettingsError(variable, str(exc)) from None


__all__ = [
    "Route",
    "Routing",
    "Sink",
    "SinkContext",
    "SinkPlugin",
    "SinkRouter",
    "delivery_id",
    "enable_routes",
    "event_json",
]
