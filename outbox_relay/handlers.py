"""Handlers by ``kind``, and the plugins that bring them (domains such as reservations, sinks).

A handler is ``async def handler(conn, event) -> None``. The worker calls it
inside the transaction that then moves the row to ``finished``, so whatever the
handler writes through ``conn`` commits together with that move, or not at all.
A handler raises :class:`~outbox_relay.exceptions.PermanentError` for an event
that can never succeed; any other exception is retried.

Two ways to add handlers, both loaded once at the edge by :func:`load_plugins`:

* a **plugin**: a :class:`Plugin` (handlers, an optional one-statement fast
  path, its own migration set) published under the entry-point group
  ``outbox_relay.plugins``, or named as ``module:attribute`` in
  ``OUTBOX_RELAY_HANDLER_MODULES``; the shipped reservation domain is one;
* a **module** in ``OUTBOX_RELAY_HANDLER_MODULES`` that registers plain handlers::

      from outbox_relay.handlers import registry

      @registry.register("email")
      async def send_email(conn, event): ...

Besides handlers by exact kind, the registry holds **routes**: a shell pattern
(``fnmatch``) and the handler for every kind it matches, consulted in the order
added, first match wins, and only for a kind that has no handler of its own
(:meth:`HandlerRegistry.route`; the sinks' ``OUTBOX_RELAY_ROUTES`` fill them).
A plugin that holds connections (a broker client, an HTTP pool) gives a
``lifespan``: an async context the worker enters once before it takes jobs and
leaves when it stops.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from outbox_relay.config import SettingsBase, load
from outbox_relay.db import Connection
from outbox_relay.diagnosis import Check
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PluginError, UnknownKindError

logger = logging.getLogger(__name__)

Handler = Callable[[Connection, OutboxEvent], Awaitable[None]]


@dataclass(frozen=True)
class Delivery:
    """A route's work done OUTSIDE any database transaction: deliver the event to another system
    (a sink) within ``seconds`` and return once that system has acknowledged it.

    The worker claims the row first (a short transaction writing a token and a
    deadline), calls ``deliver`` with no transaction open, then finishes the row in
    another short transaction that lands only while its claim holds (contract
    section 5.9). ``deliver`` raises :class:`~outbox_relay.exceptions.PermanentError`,
    :class:`~outbox_relay.exceptions.TransientError`, or :class:`PutOff` when it
    could not even start in time (the row runs again at once, the attempt not counted).
    """

    deliver: Callable[[OutboxEvent, float], Awaitable[None]]


class PutOff(Exception):
    """A delivery that did not start before its deadline: run the row again, uncounted."""


#: What a kind resolves to: a handler in the row's transaction, or a delivery outside any.
Work = Handler | Delivery
#: A plugin's part of `doctor`: the kinds of the newest rows in, check lines out (reads only).
Diagnose = Callable[[Sequence[str]], Awaitable[Sequence[Check]]]
#: A plugin's start/stop hook: called once per worker process, entered before the first job.
Lifespan = Callable[[], AbstractAsyncContextManager[object]]

#: The entry-point group plugins are published under.
ENTRY_POINT_GROUP = "outbox_relay.plugins"
#: Migration-set names the core uses itself.
RESERVED_TARGETS = frozenset({"service", "primary"})


@dataclass(frozen=True)
class FastPath:
    """A kind's common case as SQL the core composes into ONE statement with its claim and finish.

    ``ctes`` are common table expressions that read the core's ``claimed`` CTE
    (``id, correlation_id, kind, outcome, payload`` of the locked pending rows;
    filter on your ``kind``) and apply the effect; their names must start with
    the plugin's name. ``applied`` is a SELECT of the ``id`` of every claimed row
    whose effect is now in place (applied now, or found applied before): the core
    finishes exactly those. A row the fast path does not finish takes the general
    path (the handler), which decides what is wrong with it.
    """

    ctes: str
    applied: str


@dataclass(frozen=True)
class Plugin:
    """What a domain or sink brings: handlers by kind, fast paths, its own migration set."""

    name: str
    handlers: Mapping[str, Handler]
    fast_paths: Mapping[str, FastPath] = field(default_factory=dict)
    #: A directory of ``NNNN_name.sql`` files applied by ``migrate`` as the set ``name``.
    migrations: Path | None = None
    #: Opened once per worker process around all of its jobs (long-lived connections).
    lifespan: Lifespan | None = None
    #: The plugin's own settings: a :class:`~outbox_relay.config.SettingsBase` with a prefix of its
    #: own (``OUTBOX_RELAY_<NAME>_``), read and checked once at the edge when the plugin is loaded
    #: (:meth:`HandlerRegistry.settings_of` then gives them).
    settings: type[SettingsBase] | None = None
    #: What `doctor` asks the plugin: given the kinds of the newest rows, its own check lines (the
    #: routed sinks: their servers answer, the streams, topics or exchanges they need exist).
    diagnose: Diagnose | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name in RESERVED_TARGETS:
            raise PluginError(f"plugin name {self.name!r} must be an identifier other than service/primary")
        unknown = set(self.fast_paths) - set(self.handlers)
        if unknown:
            raise PluginError(f"plugin {self.name!r} has fast paths for kinds without a handler: {unknown}")


#: Kinds whose route :meth:`HandlerRegistry.get` remembers (then it starts over).
ROUTED_KINDS_KEPT = 1024


class HandlerRegistry:
    """Maps a ``kind`` to its handler; remembers the plugins it was given."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._fast_paths: dict[str, FastPath] = {}
        self._plugins: dict[str, Plugin] = {}
        self._routes: list[tuple[str, Work]] = []
        #: kind -> its route's handler (None: no route matches), so that each kind is matched
        #: against the patterns once, not once per row; bounded (kinds come from rows).
        self._routed: dict[str, Work | None] = {}
        self._settings: dict[str, SettingsBase] = {}

    def register(self, kind: str) -> Callable[[Handler], Handler]:
        """Decorator: make ``handler`` the one for ``kind``."""

        def decorate(handler: Handler) -> Handler:
            self._add_handler(kind, handler)
            return handler

        return decorate

    def add_plugin(self, plugin: Plugin) -> None:
        """Register every handler and fast path of ``plugin`` (adding it twice is a no-op)."""
        if self._plugins.get(plugin.name) is plugin:
            return
        if plugin.name in self._plugins:
            raise PluginError(f"two different plugins are named {plugin.name!r}")
        for kind, handler in plugin.handlers.items():
            self._add_handler(kind, handler)
        self._fast_paths.update(plugin.fast_paths)
        self._plugins[plugin.name] = plugin

    def _add_handler(self, kind: str, handler: Handler) -> None:
        if kind in self._handlers and self._handlers[kind] is not handler:
            raise PluginError(f"a handler for kind {kind!r} is already registered")
        self._handlers[kind] = handler

    def route(self, pattern: str, handler: Work) -> None:
        """Make ``handler`` (or a :class:`Delivery`) the one for every kind matching the shell
        ``pattern`` that has no handler of its own; earlier routes win over later ones."""
        self._routes.append((pattern, handler))
        self._routed.clear()

    def get(self, kind: str) -> Work:
        """The handler of ``kind``, else the first route matching it; :class:`UnknownKindError`
        (permanent) when neither."""
        own = self._handlers.get(kind)
        if own is not None:
            return own
        work: Work | None
        if kind in self._routed:
            work = self._routed[kind]
        else:
            work = next((routed for pattern, routed in self._routes if fnmatchcase(kind, pattern)), None)
            if len(self._routed) >= ROUTED_KINDS_KEPT:
                self._routed.clear()
            self._routed[kind] = work
        if work is None:
            raise UnknownKindError(f"unknown kind {kind!r}: no handler is registered for it")
        return work

    def kinds(self) -> list[str]:
        """Every registered kind."""
        return sorted(self._handlers)

    def routes(self) -> list[str]:
        """The route patterns, in the order they are consulted."""
        return [pattern for pattern, _ in self._routes]

    def fast_paths(self) -> dict[str, FastPath]:
        """The fast path of every kind that has one."""
        return dict(self._fast_paths)

    def plugins(self) -> list[Plugin]:
        """The plugins registered, in registration order."""
        return list(self._plugins.values())

    def read_settings(self, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Read every registered plugin's settings from the environment, once (at the edge);
        ``overrides`` gives values by plugin name over the environment's (as flags do for the core).

        A bad value is a :class:`~outbox_relay.exceptions.SettingsError` naming its variable.
        """
        for plugin in self._plugins.values():
            if plugin.settings is not None and plugin.name not in self._settings:
                self._settings[plugin.name] = load(plugin.settings, (overrides or {}).get(plugin.name))

    def settings_of(self, name: str) -> SettingsBase | None:
        """The settings plugin ``name`` declared, as read by :meth:`read_settings` (None: it declares
        none, or they were not read)."""
        return self._settings.get(name)


#: The registry the worker uses; filled at the edge by :func:`load_plugins`.
registry = HandlerRegistry()


def load_plugins(
    target: HandlerRegistry,
    modules: Iterable[str] = (),
    *,
    discover: bool = True,
) -> HandlerRegistry:
    """Fill ``target`` with the installed plugins (entry points) and ``modules``.

    Each of ``modules`` is ``package.module`` (imported: its decorators register
    handlers on :data:`registry`, and a module-level ``plugin`` is added) or
    ``package.module:attribute`` naming a :class:`Plugin`. A module that cannot be
    imported raises :class:`PluginError` naming it.
    """
    if discover:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = entry.load()
            except Exception as exc:
                raise PluginError(f"cannot load plugin {entry.name!r} ({entry.value}): {exc}") from None
            target.add_plugin(_as_plugin(loaded, entry.value))
    for spec in modules:
        module_name, _, attribute = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(f"cannot import {module_name!r}: {exc}") from None
        if attribute:
            target.add_plugin(_as_plugin(getattr(module, attribute, None), spec))
        elif isinstance(getattr(module, "plugin", None), Plugin):
            target.add_plugin(module.plugin)
    return target


def _as_plugin(value: object, where: str) -> Plugin:
    if isinstance(value, Plugin):
        return value
    raise PluginError(f"{where} is not an outbox_relay.handlers.Plugin")
