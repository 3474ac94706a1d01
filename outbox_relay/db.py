"""PostgreSQL access: connections and pools (asyncpg), retried as the caller's role demands."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from outbox_relay.retry import retry

logger = logging.getLogger(__name__)

#: Seconds a one-off command (migrate, status, requeue, ...) keeps trying to connect.
ONE_OFF_CONNECT_WINDOW = 8.0

Record = asyncpg.Record
if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    #: A connection of our own (``connect``): the listener needs one of these.
    DirectConnection: TypeAlias = asyncpg.Connection[Record]
    #: Either kind of connection: our own, or one borrowed from a pool.
    Connection: TypeAlias = asyncpg.Connection[Record] | PoolConnectionProxy[Record]
    Pool: TypeAlias = asyncpg.Pool[Record]
else:
    DirectConnection = asyncpg.Connection
    Connection = asyncpg.Connection | PoolConnectionProxy
    Pool = asyncpg.Pool


async def connect(
    url: str, *, application_name: str = "outbox_relay", timeout: float = 5.0
) -> DirectConnection:
    """One connection; statement_cache on (the hot path runs prepared statements)."""
    return await asyncpg.connect(
        url,
        timeout=timeout,
        server_settings={"application_name": application_name},
    )


async def connect_retrying(
    url: str,
    *,
    what: str = "PostgreSQL",
    application_name: str = "outbox_relay",
    give_up_after: float | None = ONE_OFF_CONNECT_WINDOW,
    stop: asyncio.Event | None = None,
) -> DirectConnection:
    """Connect, retrying with capped backoff (forever when ``give_up_after`` is None)."""

    async def attempt() -> DirectConnection:
        return await connect(url, application_name=application_name)

    return await retry(
        attempt,
        what=what,
        logger=logger,
        give_up_after=give_up_after,
        stop=stop,
        retry_on=(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError),
    )


async def create_pool(
    url: str,
    *,
    max_size: int,
    application_name: str = "outbox_relay",
    session_settings: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Pool:
    """A lazily connecting pool: it can be made while the database is down.

    ``session_settings`` are set on each of its connections (e.g. ``lock_timeout``).
    """
    pool = asyncpg.create_pool(
        url,
        reset=_rollback_if_needed,
        min_size=0,
        max_size=max_size,
        max_inactive_connection_lifetime=60.0,
        server_settings={**(session_settings or {}), "application_name": application_name},
        timeout=5.0,
        **kwargs,
    )
    await pool  # with min_size=0 this opens no connection
    return pool


async def _rollback_if_needed(conn: Connection) -> None:
    """Reset on release, cheaply: our pooled connections never LISTEN, lock or change
    session settings, so asyncpg's full reset (a round trip per release) buys nothing."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (for DDL, which takes no parameters)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal (for DDL, which takes no parameters)."""
    return "'" + value.replace("'", "''") + "'"
