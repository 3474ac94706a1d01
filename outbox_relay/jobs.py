"""The arq side of the relay: job ids, the Redis client and batched, deduplicating enqueue."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import ConnectionPool

#: The arq function every outbox job runs (see outbox_relay.worker).
FUNCTION_NAME = "outbox_relay.process_row"

#: How long an enqueued job stays valid in Redis if no worker starts it. The
#: sweep enqueues a row again long before this matters.
JOB_TTL_MS = 24 * 3600 * 1000

_SCRIPT = (Path(__file__).resolve().parent / "enqueue.lua").read_text()


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A row to hand to the queue."""

    id: int
    correlation_id: str
    generation: int = 0
    #: Carried in the job so that the worker can take the kind's one-statement fast path.
    kind: str | None = None


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


class JobQueue:
    """Enqueue outbox rows as arq jobs, many per Redis round trip."""

    def __init__(self, redis: ArqRedis, *, queue_name: str, namespace: str) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.namespace = namespace
        self._script = redis.register_script(_SCRIPT)

    async def enqueue(self, rows: Sequence[PendingRow]) -> tuple[int, int]:
        """Enqueue ``rows``; returns (jobs added, queue length after).

        A row whose job id is already known to arq is not added again (it is
        waiting, running, or being retried); it counts as handed over all the same.
        """
        if not rows:
            return 0, await self.depth()
        now_ms = int(time.time() * 1000)
        ids = [job_id(self.namespace, row.correlation_id, row.generation) for row in rows]
        keys: list[str] = [self.queue_name]
        for jid in ids:
            keys.append(job_key_prefix + jid)
            keys.append(result_key_prefix + jid)
        payloads: list[Any] = [
            serialize_job(FUNCTION_NAME, (row.id, row.kind), {}, None, now_ms) for row in rows
        ]
        result = await self._script(keys=keys, args=[now_ms, JOB_TTL_MS, *payloads, *ids])
        flags, depth = result[:-1], int(result[-1])
        return sum(int(flag) for flag in flags), depth

    async def depth(self) -> int:
        """Jobs waiting in the queue (including deferred retries)."""
        return int(await self.redis.zcard(self.queue_name))

    async def server_run_id(self) -> str:
        """Redis's run id: it changes when the server restarts (and may have lost everything)."""
        info = await self.redis.info("server")
        return str(info.get("run_id", ""))
