"""ROUTES: which kinds go to which sinks (``KIND_PATTERN=SINK[+SINK]``, comma-separated)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

#: A sink's name in ROUTES, and a kind pattern: no separators, no blanks.
_SINK_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_PATTERN_RE = re.compile(r"^[^\s,=+]+$")
#: ROUTES is at most this many characters and entries (a kind is matched against each pattern in
#: turn: a longer list is a mistake, and it would slow every routed row).
MAX_ROUTES_CHARS = 10_000
MAX_ROUTES = 200


@dataclass(frozen=True)
class Route:
    """One entry of ROUTES: the kinds matching ``pattern`` go to each of ``sinks``."""

    pattern: str
    sinks: tuple[str, ...]


def parse_routes(text: str) -> tuple[Route, ...]:
    """``"ev.*=nats+webhook, audit=nats"`` as routes; a malformed entry, a pattern given twice (the
    second would never match: the first match wins) or a list past :data:`MAX_ROUTES_CHARS`
    characters or :data:`MAX_ROUTES` entries is a ``ValueError``."""
    if len(text) > MAX_ROUTES_CHARS:
        raise ValueError(f"is {len(text):,} characters long; at most {MAX_ROUTES_CHARS:,} are allowed")
    routes: dict[str, Route] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        pattern, equals, names = (part.strip() for part in entry.partition("="))
        sinks = tuple(name.strip() for name in names.split("+"))
        if not (equals and _PATTERN_RE.match(pattern) and all(_SINK_RE.match(s) for s in sinks)):
            raise ValueError(f"entry {entry!r} is not KIND_PATTERN=SINK or KIND_PATTERN=SINK+SINK")
        if len(set(sinks)) != len(sinks):
            raise ValueError(f"entry {entry!r} names a sink twice")
        if pattern in routes:
            raise ValueError(
                f"pattern {pattern!r} appears twice (the first match wins: the second never would)"
            )
        if len(routes) == MAX_ROUTES:
            raise ValueError(f"has more than {MAX_ROUTES} entries")
        routes[pattern] = Route(pattern, sinks)
    return tuple(routes.values())


def sinks_named(routes: tuple[Route, ...]) -> tuple[str, ...]:
    """Every sink the routes name, once each, in order of first mention."""
    return tuple(dict.fromkeys(name for route in routes for name in route.sinks))


def first_route(routes: tuple[Route, ...], kind: str) -> Route | None:
    """The route ``kind`` takes (the first whose pattern matches it), if any."""
    return next((route for route in routes if fnmatchcase(kind, route.pattern)), None)
