"""The producer side: job ids, the Redis client and batched, deduplicating enqueue."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from outbox_relay.exceptions import QueueError, QueueUnavailable
from outbox_relay.logs import describe
from outbox_relay.queue import HandOver, PendingJob

#: The arq function every outbox job runs (see consumer.py).
FUNCTION_NAME = "outbox_relay.process_row"

#: How long an enqueued job stays valid in Redis if no worker starts it. The
#: sweep enqueues a row again long before this matters.
JOB_TTL_MS = 24 * 3600 * 1000

_SCRIPT = (Path(__file__).resolve().parent / "enqueue.lua").read_text()


@dataclass(frozen=True)
class QueueConfig:
    """Where the queue lives: Redis URL (a secret: never logged), queue name, job-id namespace."""

    redis_url: str
    queue_name: str
    namespace: str
    max_connections: int = 20

    def __repr__(self) -> str:
        return f"QueueConfig(queue_name={self.queue_name!r}, namespace={self.namespace!r})"


def job_id(namespace: str, correlation_id: str, generation: int = 0) -> str:
    """The arq job id of a row: made from its correlation id, so it is never queued twice.

    ``namespace`` (``outbox_relay:<queue name>``) keeps services that share one
    Redis apart; a requeued row (``generation`` > 0) gets a new id so that it
    never waits for whatever the queue kept of its earlier attempts. ``%``, ``:``
    and ``#`` in the correlation id are escaped, so that the last ``:`` and the
    ``#`` are unambiguous: no two rows, queues or generations share an id.
    """
    escaped = correlation_id.replace("%", "%25").replace(":", "%3A").replace("#", "%23")
    base = f"{namespace}:{escaped}"
    return base if generation == 0 else f"{base}#{generation}"


def redis_client(url: str, *, queue_name: str, max_connections: int = 20) -> ArqRedis:
    """An arq Redis client; it connects lazily, so it can be made while Redis is down."""
    pool = ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        retry_on_timeout=False,
    )
    return ArqRedis(pool, default_queue_name=queue_name)


@asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Redis's errors as the port's: unreachable is :class:`QueueUnavailable`, a refusal
    (an error reply such as WRONGTYPE) is :class:`QueueError`."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
        raise QueueUnavailable(f"cannot reach Redis: {describe(exc)}") from exc
    except RedisError as exc:
        raise QueueError(f"Redis refused: {describe(exc)}") from exc


class ArqQueue:
    """:class:`outbox_relay.queue.Queue` on arq: many jobs per Redis round trip."""

    server = "Redis"

    def __init__(self, config: QueueConfig) -> None:
        self.config = config
        self.redis = redis_client(
            config.redis_url, queue_name=config.queue_name, max_connections=config.max_connections
        )
        self._script = self.redis.register_script(_SCRIPT)

    async def hand_over(self, rows: Sequence[PendingJob]) -> HandOver:
        """Enqueue ``rows``, with arq's own dedupe rule (see enqueue.lua).

        A row whose job id is already known to arq is not added again (it is
        waiting, running, or being retried); it counts as handed over all the same.
        """
        if not rows:
            return HandOver(0, await self.depth())
        now_ms = int(time.time() * 1000)
        ids = [job_id(self.config.namespace, row.correlation_id, row.generation) for row in rows]
        keys: list[str] = [self.config.queue_name]
        for jid in ids:
            keys.append(job_key_prefix + jid)
            keys.append(result_key_prefix + jid)
        payloads: list[Any] = [serialize_job(FUNCTION_NAME, (row.id,), {}, None, now_ms) for row in rows]
        async with translated_errors():
            result = await self._script(keys=keys, args=[now_ms, JOB_TTL_MS, *payloads, *ids])
        flags, depth = result[:-1], int(result[-1])
        return HandOver(sum(int(flag) for flag in flags), depth)

    async def depth(self) -> int:
        """Jobs waiting in the queue (including deferred retries)."""
        async with translated_errors():
            return int(await self.redis.zcard(self.config.queue_name))

    async def epoch(self) -> str:
        """Redis's run id: it changes when the server restarts (and may have lost everything)."""
        async with translated_errors():
            info = await self.redis.info("server")
        return str(info.get("run_id", ""))

    async def close(self) -> None:
        """Close the Redis connections."""
        await self.redis.aclose(close_connection_pool=True)
