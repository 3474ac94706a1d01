"""Every Redis client of the adapter, from one URL: a Redis directly, or a Sentinel set.

``redis://``, ``rediss://`` and ``unix://`` name one Redis. ``redis+sentinel://``
(``rediss+sentinel://``: TLS to the Redis nodes) names a set of sentinels and a
service: ``redis+sentinel://[[user]:password@]host:port[,host:port…]/SERVICE[/DB]``.
The credentials authenticate to the sentinels and to the Redis nodes alike. A
client of a Sentinel set asks the sentinels for the master whenever it opens a
connection, so after a failover the next connection (every caller reconnects after
an error) reaches the promoted replica; a connection to a demoted master is dropped
on its first READONLY reply. The adapter's scripts (register_script) run on the
same client, so they follow the master too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from outbox_relay.config import check_url

#: The URL schemes of a Sentinel set (plain, and TLS to the Redis nodes).
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: A sentinel's port when the URL gives none.
SENTINEL_PORT = 26379
#: Seconds to connect to, and to wait for an answer from, a Redis node or a sentinel.
SOCKET_TIMEOUT = 5.0


@dataclass(frozen=True)
class SentinelTarget:
    """A Sentinel set as a URL names it; ``password`` is a secret (never in its repr)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def auth(self) -> dict[str, Any]:
        """The credentials, as redis-py's keyword arguments."""
        found = {"username": self.username, "password": self.password}
        return {key: value for key, value in found.items() if value}

    def addresses(self) -> str:
        """``host:port, host:port`` (safe to show)."""
        return ", ".join(f"{host}:{port}" for host, port in self.sentinels)


def is_sentinel(url: str) -> bool:
    """True when ``url`` names a Sentinel set."""
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def _address(text: str) -> tuple[str, int]:
    """``host:port``, ``host`` or ``[v6]:port`` as (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError("names a sentinel without a host")
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("has a sentinel port that is not a number from 1 to 65535")
    return host, int(port) if port else SENTINEL_PORT


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The Sentinel set ``url`` names; a ``ValueError`` (never quoting the URL) when malformed."""
    check_url(url, SENTINEL_SCHEMES)  # parses, the scheme, every port
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError("takes no query or fragment in its Sentinel form")
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise ValueError("names no sentinel (host:port[,host:port…])")
    sentinels = tuple(_address(host) for host in hosts.split(","))
    segments = parts.path.removeprefix("/").split("/")
    if not segments[0] or len(segments) > 2 or (len(segments) == 2 and not segments[1]):
        raise ValueError("must end in /SERVICE or /SERVICE/DB (the service name the sentinels know)")
    db = segments[1] if len(segments) == 2 else "0"
    if not (db.isdigit() and int(db) < 2**31):
        raise ValueError("has a database number that is not a whole number")
    return SentinelTarget(
        sentinels=sentinels,
        service=unquote(segments[0]),
        db=int(db),
        tls=parts.scheme == "rediss+sentinel",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def check_redis_url(url: str) -> None:
    """A ``ValueError`` unless ``url`` is a form the adapter takes (the Sentinel form is parsed)."""
    if is_sentinel(url):
        parse_sentinel_url(url)


class _SentinelPool(SentinelConnectionPool):
    """redis-py's Sentinel pool that also closes its sentinels' connections when closed."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # a full close (aclose), not a move to a new master
            for client in self.sentinel_manager.sentinels:
                await client.aclose()


def _node_options(max_connections: int) -> dict[str, Any]:
    return {
        "max_connections": max_connections,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "retry_on_timeout": False,
    }


def sentinel_manager(target: SentinelTarget) -> Sentinel:
    """redis-py's Sentinel for ``target``: the sentinels reached with the URL's credentials."""
    timeouts = {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": SOCKET_TIMEOUT}
    return Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs={**timeouts, **target.auth()}
    )


def redis_client(url: str, *, queue_name: str, max_connections: int = 20) -> ArqRedis:
    """An arq Redis client of ``url`` (either form); it connects lazily, so it can be made while
    Redis (or every sentinel) is down."""
    if not is_sentinel(url):
        pool = ConnectionPool.from_url(url, **_node_options(max_connections))
        return ArqRedis(pool, default_queue_name=queue_name)
    target = parse_sentinel_url(url)
    options: Mapping[str, Any] = {**_node_options(max_connections), **target.auth(), "db": target.db}
    sentinel_pool = _SentinelPool(  # type: ignore[no-untyped-call]
        target.service, sentinel_manager(target), is_master=True, ssl=target.tls, **options
    )
    return ArqRedis(sentinel_pool, default_queue_name=queue_name)


def sentinel_clients(target: SentinelTarget) -> list[Redis]:
    """One plain client per sentinel (for `doctor`); the caller closes them."""
    return list(sentinel_manager(target).sentinels)
