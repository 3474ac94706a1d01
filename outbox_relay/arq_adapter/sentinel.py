"""What `doctor` reads of a Sentinel set: the sentinels reached, the service's master and replicas.

Every sentinel of the URL is asked (``SENTINEL MASTER``, ``SENTINEL REPLICAS``),
each on its own connection, read-only; the credentials are the URL's and never
shown (the line names sentinels by ``host:port`` only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from outbox_relay.arq_adapter.connection import SentinelTarget, sentinel_clients
from outbox_relay.diagnosis import Check
from outbox_relay.logs import describe

#: The name of doctor's line.
CHECK = "redis sentinel"


@dataclass
class SentinelView:
    """What the sentinels said of the service."""

    asked: int
    reached: int = 0
    #: Sentinels that answered and know the service.
    knowing: int = 0
    master: str | None = None
    #: ``host:port (state)`` of each replica the first knowing sentinel lists.
    replicas: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _replica(state: dict[str, Any]) -> str:
    down = state.get("is_sdown") or state.get("is_odown")
    link = state.get("master-link-status", "")
    return f"{state.get('ip')}:{state.get('port')} ({'down' if down else 'link ' + str(link)})"


async def _ask(client: Redis, service: str, view: SentinelView) -> None:
    try:
        master = await client.sentinel_master(service)  # type: ignore[no-untyped-call]
    except ResponseError as exc:
        if "no such master" not in str(exc).lower():
            raise
        view.reached += 1
        return
    view.reached += 1
    view.knowing += 1
    if view.master is None:
        view.master = f"{master['ip']}:{master['port']}"
        view.replicas = [_replica(state) for state in await client.sentinel_slaves(service)]  # type: ignore[no-untyped-call]


async def read_sentinels(target: SentinelTarget) -> SentinelView:
    """Ask every sentinel of ``target`` about its service (never raises for what it finds)."""
    clients = sentinel_clients(target)
    view = SentinelView(asked=len(clients))
    for client, (host, port) in zip(clients, target.sentinels, strict=True):
        try:
            await _ask(client, target.service, view)
        except (RedisError, OSError, TimeoutError) as exc:
            view.errors.append(f"{host}:{port}: {describe(exc)}")
        finally:
            await client.aclose()
    return view


def sentinel_check(target: SentinelTarget, view: SentinelView) -> Check:
    """Doctor's ``redis sentinel`` line: fail when no sentinel reached knows the service."""
    reached = f"{view.reached} of {view.asked} sentinels reached"
    if view.reached == 0:
        return Check(
            CHECK,
            "fail",
            f"{reached} ({target.addresses()}): {view.errors[0] if view.errors else 'no answer'}",
            "check the sentinels' addresses in OUTBOX_RELAY_REDIS_URL and that they are up",
        )
    if view.knowing == 0 or view.master is None:
        return Check(
            CHECK,
            "fail",
            f"{reached}, and none knows the service {target.service!r}",
            "set the service name the sentinels monitor in OUTBOX_RELAY_REDIS_URL "
            "(redis-cli -p <sentinel port> SENTINEL MASTERS lists them)",
        )
    replicas = ", ".join(view.replicas) or "none"
    detail = (
        f"{reached}, {view.knowing} know {target.service!r}; master {view.master}; "
        f"{len(view.replicas)} replica(s): {replicas}"
    )
    if view.reached < view.asked or not view.replicas:
        why = view.errors[0] if view.errors else "no replica to promote"
        return Check(
            CHECK, "warn", f"{detail} ({why})", "a failover needs a replica and a quorum of sentinels"
        )
    return Check(CHECK, "ok", detail)
