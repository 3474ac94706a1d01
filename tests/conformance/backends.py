"""The two implementations of the queue port, made by the backend factory from their URLs
(``memory://NAME``, ``redis://…``), behind one small test interface.

A :class:`Backend` is one queue of one implementation: a producer (``queue``),
consumers on the same queue, and the two ways a test makes the queue lose
jobs (the server restarted empty; jobs gone while their markers stay), each
played through the backend's own hooks (memory) or the server itself (arq).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest
from arq.constants import health_check_key_suffix, in_progress_key_prefix, job_key_prefix

from outbox_relay.arq_adapter.producer import MARKER_PREFIX, redis_client, wake_key
from outbox_relay.exceptions import QueueUnavailable
from outbox_relay.queue import Consumer, ConsumerStats, Job, JobFunction, Outcome, Queue, memory
from outbox_relay.queue.backends import QueueBackend, QueueOptions, from_url
from tests.servers import ExternalRedis, RedisServer

#: Rows per job of ``Backend.queue`` (a test wanting another size asks ``producer``).
DEFAULT_BATCH_SIZE = 50
#: Deadline of any one wait in the suite (seconds): far above what a healthy run needs.
DEADLINE = 10.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Row:
    """A row to hand over (:class:`~outbox_relay.queue.PendingJob`)."""

    id: int
    correlation_id: str
    generation: int = 0


def rows(*ids: int) -> list[Row]:
    """Rows of these ids, correlation id ``cid-<id>``, generation 0."""
    return [Row(i, f"cid-{i}") for i in ids]


class Backend(ABC):
    """One queue of one implementation of the port, fresh for one test."""

    name: str
    #: A producer on the queue, packing up to DEFAULT_BATCH_SIZE rows per job.
    queue: Queue

    @abstractmethod
    def producer(self, batch_size: int, identity: str = "") -> Queue:
        """A producer on this queue packing up to ``batch_size`` rows per job (memory: the one
        queue, resized), stamping its jobs with the service database ``identity`` ("": none)."""

    @abstractmethod
    def consumer(self, identity: str = "") -> Consumer:
        """A consumer of this queue (memory: the queue itself) for the service database ``identity``
        ("": it runs every job)."""

    @abstractmethod
    async def restart_empty(self) -> None:
        """Make the queue's server lose everything, as a restart without persistence does."""

    @abstractmethod
    async def orphan_waiting(self) -> None:
        """Lose every waiting job that no consumer runs, keeping its rows' dedupe markers."""

    @abstractmethod
    async def close(self) -> None:
        """Close every producer and consumer made, and remove what the queue left on its server."""


class MemoryBackend(Backend):
    """The in-memory queue: producer and consumer are one object."""

    name = "memory"

    def __init__(self) -> None:
        name = f"conformance-{uuid.uuid4().hex[:8]}"
        made = from_url(f"memory://{name}", QueueOptions(name, name, batch_size=DEFAULT_BATCH_SIZE))
        assert isinstance(made, memory.MemoryBackend), made
        self.memory = made.queue
        self.queue = self.memory

    def producer(self, batch_size: int, identity: str = "") -> Queue:
        if identity:
            return self.memory.side(identity, batch_size=batch_size)
        self.memory.batch_size = batch_size
        return self.memory

    def consumer(self, identity: str = "") -> Consumer:
        return self.memory.side(identity) if identity else self.memory

    async def restart_empty(self) -> None:
        self.memory.lose_everything()

    async def orphan_waiting(self) -> None:
        self.memory.orphan()

    async def close(self) -> None:
        await self.memory.close()


class ArqBackend(Backend):
    """The arq adapter on a real Redis, under a queue name (and job namespace) of its own."""

    name = "arq"

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.url = server.url()
        self.queue_name = f"conformance_{uuid.uuid4().hex[:12]}"
        self.namespace = f"outbox_relay:{self.queue_name}"
        self._producers: list[Queue] = []
        self._consumers: list[Consumer] = []
        self.queue = self.producer(DEFAULT_BATCH_SIZE)

    def _backend(self, batch_size: int = DEFAULT_BATCH_SIZE, identity: str = "") -> QueueBackend:
        # Consumers run one job at a time, as the in-memory consumer does; a short idle wait, so
        # that a burst notices the queue ran dry soon after its last job.
        options = QueueOptions(
            self.queue_name,
            self.namespace,
            batch_size=batch_size,
            concurrency=1,
            poll_delay=0.01,
            job_timeout=DEADLINE,
            idle_wait=0.1,
            identity=identity,
        )
        made = from_url(self.url, options)
        assert made.name == "Redis", made
        return made

    def producer(self, batch_size: int, identity: str = "") -> Queue:
        made = self._backend(batch_size, identity).producer()
        self._producers.append(made)
        return made

    def consumer(self, identity: str = "") -> Consumer:
        made = self._backend(identity=identity).consumer()
        self._consumers.append(made)
        return made

    async def restart_empty(self) -> None:
        if isinstance(self.server, ExternalRedis):
            pytest.skip("the Redis of OUTBOX_RELAY_TEST_REDIS_URL is never restarted by the tests")
        await asyncio.to_thread(self.server.restart)

    async def orphan_waiting(self) -> None:
        redis = redis_client(self.url, queue_name=self.queue_name, max_connections=2)
        try:
            for raw in await redis.zrange(self.queue_name, 0, -1):
                job = raw.decode()
                if not await redis.exists(in_progress_key_prefix + job):
                    await redis.delete(job_key_prefix + job)
                    await redis.zrem(self.queue_name, job)
        finally:
            await redis.aclose(close_connection_pool=True)

    async def close(self) -> None:
        for producer in self._producers:
            await producer.close()
        for consumer in self._consumers:
            await consumer.close()
        with contextlib.suppress(Exception):  # the server may be down after a failed test
            await self._remove_keys()

    async def _remove_keys(self) -> None:
        redis = redis_client(self.url, queue_name=self.queue_name, max_connections=2)
        try:
            jobs = [raw.decode() for raw in await redis.zrange(self.queue_name, 0, -1)]
            keys = [job_key_prefix + job for job in jobs] + [in_progress_key_prefix + job for job in jobs]
            keys += [self.queue_name, wake_key(self.queue_name), self.queue_name + health_check_key_suffix]
            keys += [key async for key in redis.scan_iter(match=f"{MARKER_PREFIX}{self.namespace}:*")]
            await redis.delete(*keys)
        finally:
            await redis.aclose(close_connection_pool=True)


def finish_all(jobs: Sequence[Job]) -> list[Outcome]:
    """Every row finished."""
    return [Outcome("finished") for _ in jobs]


class Recorder:
    """A job function that notes each batch it is given (row id, delivery) and when its run ended,
    and answers each batch with ``decide(call number, jobs)`` (call numbers start at 1; by default
    every row finishes)."""

    def __init__(self, decide: Callable[[int, Sequence[Job]], list[Outcome]] | None = None) -> None:
        self.decide = decide or (lambda _call, jobs: finish_all(jobs))
        self.batches: list[list[tuple[int, int]]] = []
        self.started: list[float] = []
        self.ended: list[float] = []

    async def __call__(self, jobs: Sequence[Job]) -> list[Outcome]:
        self.started.append(time.monotonic())
        self.batches.append([(job.row_id, job.delivery) for job in jobs])
        outcomes = self.decide(len(self.batches), jobs)
        self.ended.append(time.monotonic())
        return outcomes


async def run_burst(consumer: Consumer, function: JobFunction) -> ConsumerStats:
    """Run ``consumer`` in burst mode until the queue is empty (within the suite's deadline)."""
    return await asyncio.wait_for(consumer.run(function, asyncio.Event(), burst=True), DEADLINE)


async def answered(call: Callable[[], Awaitable[T]]) -> T:
    """``call``'s result once the queue's server answers (it may be restarting), within the deadline."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            return await call()
        except QueueUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
