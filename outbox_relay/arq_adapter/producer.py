"""The producer side: row keys, the Redis client and batched, deduplicating, all-or-nothing enqueue.

A hand-over is one Redis call (enqueue.lua): rows whose dedupe marker names a
job still waiting or running are skipped, the others are packed into batch
jobs of up to ``batch_size`` rows (JSON, arq's job fields; the service
database's identity as the keyword argument ``database``), each job pushes one
element on the queue's wake-up list (workers block on it instead of polling).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from outbox_relay.arq_adapter.connection import redis_client as redis_client  # the one way to make one
from outbox_relay.exceptions import QueueError, QueueUnavailable
from outbox_relay.logs import describe, scrub
from outbox_relay.queue import HandOver, PendingJob

#: The arq function of 0.1.0's one-row jobs (still run, see consumer.py).
FUNCTION_NAME = "outbox_relay.process_row"
#: The arq function of a batch job: ``rows`` is ``[[row id, marker key, delivery], ...]``.
BATCH_FUNCTION_NAME = "outbox_relay.process_rows"
#: Prefix of a row's dedupe marker key (followed by the row's job id, :func:`job_id`).
MARKER_PREFIX = "outbox_relay:row:"

#: How long an enqueued job stays valid in Redis if no worker starts it. The
#: sweep enqueues a row again long before this matters.
JOB_TTL_MS = 24 * 3600 * 1000

_SCRIPT = (Path(__file__).resolve().parent / "enqueue.lua").read_text()


def workers_key(queue_name: str) -> str:
    """The sorted set of the databases the live workers of a queue serve: member = identity,
    score = until when (ms) a worker last said so."""
    return f"outbox_relay:workers:{queue_name}"


def wake_key(queue_name: str) -> str:
    """The list a worker blocks on: the relay pushes one element per job it adds."""
    return f"outbox_relay:wake:{queue_name}"


def marker_key(namespace: str, correlation_id: str, generation: int = 0) -> str:
    """The dedupe marker of a row: it names the job holding the row while one does."""
    return MARKER_PREFIX + job_id(namespace, correlation_id, generation)


@dataclass(frozen=True)
class QueueConfig:
    """Where the queue lives: Redis URL (a secret: never logged), queue name, job-id namespace."""

    redis_url: str
    queue_name: str
    namespace: str
    max_connections: int = 20
    #: Rows per batch job at most (a hand-over of fewer rows makes smaller jobs).
    batch_size: int = 50
    #: The service database's identity, carried by every job ("": none).
    identity: str = ""

    def __repr__(self) -> str:
        return f"QueueConfig(queue_name={self.queue_name!r}, namespace={self.namespace!r})"


def job_id(namespace: str, correlation_id: str, generation: int = 0) -> str:
    """The id of a row in the queue: made from its correlation id, so it is never queued twice
    (its dedupe marker is :func:`marker_key`; 0.1.0 used it as the arq job id).

    ``namespace`` (``outbox_relay:<queue name>``) keeps services that share one
    Redis apart; a requeued row (``generation`` > 0) gets a new id so that it
    never waits for whatever the queue kept of its earlier attempts. ``%``, ``:``
    and ``#`` in the correlation id are escaped, so that the last ``:`` and the
    ``#`` are unambiguous: no two rows, queues or generations share an id.
    """
    escaped = correlation_id.replace("%", "%25").replace(":", "%3A").replace("#", "%23")
    base = f"{namespace}:{escaped}"
    return base if generation == 0 else f"{base}#{generation}"


@asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Redis's errors as the port's: unreachable is :class:`QueueUnavailable`, a refusal
    (an error reply such as WRONGTYPE) is :class:`QueueError`."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
        raise QueueUnavailable(f"cannot reach Redis: {describe(exc)}") from exc
    except ResponseError as exc:
        # An error reply says what it is itself ("WRONGTYPE ...", "OOM ...").
        reply = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QueueError(f"Redis refused: {scrub(reply)}") from exc
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
        """Enqueue ``rows`` as batch jobs, all or nothing (see enqueue.lua).

        A row whose marker names a job that waits or runs is not added again (it
        counts as handed over all the same); an orphaned marker is replaced.
        ``added`` counts rows; ``unclaimed`` the due jobs no worker had taken yet.
        """
        if not rows:
            return HandOver(0, await self.depth())
        keys = [self.config.queue_name, wake_key(self.config.queue_name)]
        keys += [marker_key(self.config.namespace, row.correlation_id, row.generation) for row in rows]
        prefix = f"{self.config.namespace}:batch:{uuid.uuid4().hex}:"
        # 0: the score is the Redis server's clock (enqueue.lua), never this host's.
        args: list[Any] = [0, JOB_TTL_MS, self.config.batch_size, prefix, BATCH_FUNCTION_NAME]
        args.append(self.config.identity)
        args += [row.id for row in rows]
        async with translated_errors():
            added, _jobs, depth, unclaimed = await self._script(keys=keys, args=args)
        return HandOver(int(added), int(depth), int(unclaimed))

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
