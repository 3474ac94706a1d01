"""Sinks: handlers that deliver an event to another system and finish the row once it has acknowledged.

Each sink is a plugin of its own (``nats``, ``webhook``: a :class:`SinkPlugin`
published under the ``outbox_relay.plugins`` entry-point group, like the
reservation domain). An installed sink does nothing until ``OUTBOX_RELAY_ROUTES``
names it: :func:`enable_routes`, called once at the edge, builds the sinks the
routes name, adds one registry route per entry (a kind with a handler of its
own keeps it), and adds the plugin ``sinks`` that brings the ``deliveries``
table (its own migration set) and opens the sinks' connections once per worker
process (its lifespan).

One attempt makes one delivery per sink, all at once, outside any transaction
(the worker claims the row first: :mod:`outbox_relay.worker.deliveries`). On a
route with several sinks the acknowledgements are recorded in
``outbox_relay_sinks.deliveries`` as soon as they came, from a small pool of the
router's own, so that a retry (some sink failed, or the row's finish could not
be written) delivers only to the sinks that have not acknowledged.
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
from outbox_relay.db import Pool, create_pool
from outbox_relay.diagnosis import Check
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import (
    OutboxRelayError,
    PermanentError,
    PluginError,
    SettingsError,
    TransientError,
)
from outbox_relay.handlers import Delivery, HandlerRegistry, Plugin, PutOff
from outbox_relay.logs import describe
from outbox_relay.sinks.routes import Route, first_route, sinks_named
from outbox_relay.sql import QueryFile

logger = logging.getLogger(__name__)

query = QueryFile(Path(__file__).resolve().parent / "queries.sql")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The sinks' own plugin, installed with the package (an entry point): the deliveries table,
#: applied by every `migrate` whatever ROUTES says, so that routing is a setting of `worker` alone.
ROUTES_PLUGIN = "sinks"
#: The plugin :func:`enable_routes` adds to a worker: the routed sinks' connections (its lifespan).
LIFESPAN_PLUGIN = "routed_sinks"
#: Seconds one sink's checks may take in `doctor`.
DIAGNOSE_TIMEOUT = 10.0

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

    async def diagnose(self, kinds: Sequence[str]) -> list[Check]:
        """`doctor`'s lines (reads only, never delivers): the server answers, and what ``kinds``
        (routed to this sink, seen in the newest rows) need exists (a stream, topic, exchange)."""
        ...


@dataclass(frozen=True)
class SinkContext:
    """What a sink is built from: the routes that name it, its plugin's own settings (read at the
    edge), the service database (for bookkeeping) and how many jobs a worker runs at once."""

    routes: tuple[Route, ...]
    database_url: str = field(repr=False)
    concurrency: int
    settings: SettingsBase | None = None
    #: Deliveries in flight per sink per worker at most (SINK_IN_FLIGHT): size pools by it.
    in_flight: int = 64
    #: Time one job may take (JOB_TIMEOUT): a request timeout above it is a settings error.
    job_timeout: float = 10.0

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
    #: Deliveries in flight per sink per worker at most (SINK_IN_FLIGHT).
    in_flight: int = 64
    #: Time one job may take (JOB_TIMEOUT): a sink's own request timeout must fit in it.
    job_timeout: float = 10.0


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
    """The deliveries of the routes, and what their sinks share in one worker process: the
    sinks' connections, at most ``in_flight`` deliveries in flight per sink, and the small pool
    that records which sinks of a route have acknowledged."""

    def __init__(
        self,
        database_url: str,
        in_flight: int = 64,
        routes: tuple[Route, ...] = (),
        job_timeout: float = 10.0,
    ) -> None:
        self._database_url = database_url
        self._in_flight = in_flight
        self._routes = routes
        #: Least time a delivery must have left to start: one started later would likely be cut
        #: by the job's deadline after the receiver took it (a duplicate); put off instead.
        self._min_start = job_timeout / 2
        self._sinks: dict[str, Sink] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._progress: Pool | None = None

    def add_sink(self, sink: Sink) -> None:
        """Use ``sink`` (opened by :meth:`lifespan`)."""
        self._sinks[sink.name] = sink
        self._slots[sink.name] = asyncio.Semaphore(self._in_flight)

    def delivery(self, names: Sequence[str]) -> Delivery:
        """What delivers to the sinks ``names``, outside any transaction."""
        sinks = tuple(self._sinks[name] for name in names)

        async def deliver(event: OutboxEvent, seconds: float) -> None:
            if len(sinks) == 1:
                await self._deliver(sinks[0], event, seconds)
            else:
                await self._deliver_to_all(event, sinks, seconds)

        return Delivery(deliver)

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open every sink (and the small pool that records partial deliveries); close them after."""
        async with AsyncExitStack() as stack:
            for sink in self._sinks.values():
                await stack.enter_async_context(sink.lifespan())
            self._progress = await create_pool(
                self._database_url, max_size=4, application_name="outbox_relay.sinks"
            )
            try:
                yield
            finally:
                pool, self._progress = self._progress, None
                try:
                    await asyncio.wait_for(pool.close(), 5.0)
                except Exception:
                    pool.terminate()

    async def diagnose(self, kinds: Sequence[str]) -> list[Check]:
        """`doctor`'s lines for every routed sink: each is asked about the kinds among ``kinds`` (those
        of the newest rows) that its routes take, within DIAGNOSE_TIMEOUT seconds."""
        lines: list[Check] = []
        for name, sink in self._sinks.items():
            taken = [k for k in kinds if (route := first_route(self._routes, k)) and name in route.sinks]
            try:
                async with asyncio.timeout(DIAGNOSE_TIMEOUT):
                    lines.extend(await sink.diagnose(taken))
            except Exception as exc:
                lines.append(Check(name, "fail", f"could not check the {name} sink: {describe(exc)}"))
        return lines

    async def _deliver(self, sink: Sink, event: OutboxEvent, seconds: float) -> None:
        """One delivery to ``sink``, within ``seconds``: in one of its in-flight slots (a delivery
        that gets none in time did not start: :class:`PutOff`), cut at the deadline naming it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        slots = self._slots[sink.name]
        try:
            async with asyncio.timeout(seconds):
                await slots.acquire()
        except TimeoutError:
            raise PutOff(f"{sink.name}: no delivery slot free in {seconds:g} s") from None
        try:
            left = deadline - loop.time()
            if left < self._min_start:
                raise PutOff(f"{sink.name}: {left:.2f} s left of the job, too little to start a delivery")
            try:
                async with asyncio.timeout(left):
                    await sink.deliver(event, event_json(event), delivery_id(event))
            except TimeoutError:
                raise TransientError(
                    f"{sink.name}: no acknowledgement within {left:.1f} s (the job's JOB_TIMEOUT ran out)"
                ) from None
        finally:
            slots.release()

    async def _deliver_to_all(self, event: OutboxEvent, sinks: tuple[Sink, ...], seconds: float) -> None:
        done = await self._delivered(event)
        pending = [sink for sink in sinks if sink.name not in done]
        results = await asyncio.gather(
            *(self._deliver(sink, event, seconds) for sink in pending), return_exceptions=True
        )
        delivered = [sink.name for sink, result in zip(pending, results, strict=True) if result is None]
        failed = [
            (sink.name, result)
            for sink, result in zip(pending, results, strict=True)
            if isinstance(result, BaseException)
        ]
        if delivered:  # the next attempt (a retry, a requeue) delivers only to the others
            await self._record_delivered(event, delivered)
        if not failed:
            return
        for _, result in failed:
            if not isinstance(result, Exception):  # CancelledError and the like: not ours to keep
                raise result
        if all(isinstance(result, PutOff) for _, result in failed) and not delivered:
            raise failed[0][1]
        raise _combined(failed)

    async def _delivered(self, event: OutboxEvent) -> set[str]:
        """The sinks that acknowledged this row in an earlier, partly failed attempt."""
        if self._progress is None:
            raise TransientError("the sinks are not open (worker starting or stopping)")
        return {r["sink"] for r in await self._progress.fetch(query("delivered_sinks"), event.id)}

    async def _record_delivered(self, event: OutboxEvent, delivered: list[str]) -> None:
        """Record the sinks that acknowledged, so that a retry delivers only to the others."""
        if self._progress is None:
            return
        try:
            await self._progress.execute(query("record_deliveries"), event.id, delivered)
        except Exception as exc:  # the retry then delivers to these sinks again: a duplicate, same id
            logger.warning(
                "could not record partial delivery",
                extra={"row_id": event.id, "sinks": ",".join(delivered), "error": describe(exc)},
            )


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
    router = SinkRouter(routing.database_url, routing.in_flight, routing.routes, routing.job_timeout)
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
            in_flight=routing.in_flight,
            job_timeout=routing.job_timeout,
        )
        try:
            router.add_sink(plugin.make(context))
        except ImportError as exc:
            raise SettingsError(
                variable, f"sink {name!r} needs the extra outbox-relay[{name}] ({exc.name} is missing)"
            ) from None
    for route in routing.routes:
        registry.route(route.pattern, router.delivery(route.sinks))
    try:
        registry.add_plugin(
            Plugin(LIFESPAN_PLUGIN, handlers={}, lifespan=router.lifespan, diagnose=router.diagnose)
        )
    except PluginError as exc:
        raise SettingsError(variable, str(exc)) from None


#: The entry point of the sinks' schema (migration set ``sinks``).
plugin = Plugin(ROUTES_PLUGIN, handlers={}, migrations=MIGRATIONS)

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
