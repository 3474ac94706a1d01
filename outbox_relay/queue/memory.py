"""The queue port in memory: for fast tests of the relay's and the worker's logic.

Same rules as the arq adapter: a hand-over packs the rows that are not known
into batch jobs of up to ``batch_size`` rows (as even as possible); a row is
known while its marker names a job that waits or runs; a marker naming
anything else is orphaned and replaced. After a job ran, the rows that ended
lose their marker and each row to retry runs again alone after its delay (rows
put off run again together at once). A job of another database is put back
untouched, deferred (see :mod:`outbox_relay.queue`). :meth:`InMemoryQueue.lose_everything`
plays a server restarted empty (the epoch changes); :meth:`InMemoryQueue.orphan`
plays a job lost while its markers stayed. Each :class:`InMemoryQueue` is one
database's side of a queue (:meth:`InMemoryQueue.side` makes another database's).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from outbox_relay.diagnosis import Check
from outbox_relay.queue import (
    FOREIGN_JOB_DEFER,
    ConsumerObserver,
    ConsumerStats,
    Diagnosis,
    HandOver,
    Job,
    JobFunction,
    Outcome,
    PendingJob,
    split_batches,
)
from outbox_relay.queue.backends import QueueOptions


@dataclass
class _Entry:
    rows: list[tuple[int, str, int]]  # row id, marker, delivery
    not_before: float = 0.0
    tries: int = 0
    running: bool = False
    marker_keys: list[str] = field(default_factory=list)
    #: The identity of the database whose rows these are ("": none).
    origin: str = ""


@dataclass
class _Shared:
    """What every side of one queue sees."""

    jobs: dict[str, _Entry] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    markers: dict[str, str] = field(default_factory=dict)
    epoch: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    added: list[str] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)
    available: bool = True
    #: Consumers running now, by the identity of their database.
    consumers: dict[str, int] = field(default_factory=dict)


class InMemoryQueue:
    """Implements both sides of the port: :class:`~outbox_relay.queue.Queue` and
    :class:`~outbox_relay.queue.Consumer`."""

    _epochs = itertools.count(1)
    _job_ids = itertools.count(1)
    server = "the in-memory queue"

    def __init__(
        self,
        namespace: str = "memory",
        *,
        batch_size: int = 50,
        identity: str = "",
        shared: _Shared | None = None,
    ) -> None:
        self.namespace = namespace
        self.batch_size = batch_size
        #: The identity of this side's database (stamped on jobs, compared by the consumer).
        self.identity = identity
        self._shared = shared or _Shared(epoch=str(next(self._epochs)))
        self._jobs = self._shared.jobs
        self._waiting = self._shared.waiting
        #: Marker key -> id of the job holding that row.
        self.markers = self._shared.markers
        self._changed = self._shared.changed
        #: Every row key ever added, in order (tests read it).
        self.added = self._shared.added
        #: The row ids of every job ever added, in order (tests read it).
        self.batches = self._shared.batches

    def side(self, identity: str, *, batch_size: int | None = None) -> InMemoryQueue:
        """The same queue as the database of ``identity`` sees it (another service given this name)."""
        size = self.batch_size if batch_size is None else batch_size
        return InMemoryQueue(self.namespace, batch_size=size, identity=identity, shared=self._shared)

    @property
    def available(self) -> bool:
        """False: every call fails as an unreachable server's would."""
        return self._shared.available

    @available.setter
    def available(self, value: bool) -> None:
        self._shared.available = value

    # -- producer side ---------------------------------------------------------------

    def _check(self) -> None:
        if not self.available:
            from outbox_relay.exceptions import QueueUnavailable

            raise QueueUnavailable("the in-memory queue is switched off")

    def _known(self, marker: str) -> bool:
        holder = self.markers.get(marker)
        return holder is not None and holder in self._jobs

    def _add_job(
        self, rows: list[tuple[int, str, int]], delay: float = 0.0, origin: str | None = None
    ) -> None:
        job_id = f"job-{next(self._job_ids)}"
        not_before = asyncio.get_running_loop().time() + delay if delay else 0.0
        self._jobs[job_id] = _Entry(rows, not_before, origin=self.identity if origin is None else origin)
        self._waiting.append(job_id)
        for _, marker, _ in rows:
            self.markers[marker] = job_id
        self.batches.append([row_id for row_id, _, _ in rows])
        self._changed.set()

    async def hand_over(self, rows: Sequence[PendingJob]) -> HandOver:
        """Pack the rows that are not known into batch jobs."""
        self._check()
        now = asyncio.get_running_loop().time()
        unclaimed = sum(
            1 for j in self._waiting if not self._jobs[j].running and self._jobs[j].not_before <= now
        )
        fresh = []
        for row in rows:
            marker = f"{self.namespace}:{row.correlation_id}#{row.generation}"
            if not self._known(marker):
                fresh.append((row.id, marker, 1))
                self.added.append(marker)
        at = 0
        for size in split_batches(len(fresh), self.batch_size):
            self._add_job(fresh[at : at + size])
            at += size
        return HandOver(len(fresh), len(self._waiting), min(unclaimed, 20))

    async def depth(self) -> int:
        """Jobs waiting (deferred retries included)."""
        self._check()
        return len(self._waiting)

    async def epoch(self) -> str:
        """Changes on :meth:`lose_everything`."""
        self._check()
        return self._shared.epoch

    def lose_everything(self) -> None:
        """Forget every job and marker, as a server restarted empty would."""
        self._jobs.clear()
        self._waiting.clear()
        self.markers.clear()
        self._shared.epoch = str(next(self._epochs))

    def orphan(self) -> None:
        """Lose every waiting job but keep the markers (what a half-written enqueue leaves)."""
        for job_id in list(self._waiting):
            if not self._jobs[job_id].running:
                self._waiting.remove(job_id)
                del self._jobs[job_id]

    async def close(self) -> None:
        """Nothing to release."""

    async def diagnose(self) -> Diagnosis:
        """For `doctor`: always reachable; a worker shows itself by running a consumer."""
        waiting = len(self._waiting)
        running = {identity for identity, count in self._shared.consumers.items() if count}
        seen = f"a consumer runs on {self.namespace}" if running else None
        origins = Counter(self._jobs[job_id].origin for job_id in self._waiting[:100])
        origins.pop("", None)
        return Diagnosis(
            checks=(Check("queue", "ok", f"in memory, {waiting} jobs waiting"),),
            reachable=True,
            workers_seen=seen,
            workers_signal=f"a running consumer of {self.namespace}",
            server=self.server,
            clock_offset=0.0,  # its clock is this host's
            job_databases=dict(origins),
            worker_databases=tuple(sorted(i for i in running if i)),
        )

    # -- consumer side ---------------------------------------------------------------

    async def wait_until_ready(self, stop: asyncio.Event) -> None:
        """Always ready."""

    async def run(
        self,
        function: JobFunction,
        stop: asyncio.Event,
        *,
        burst: bool = False,
        observer: ConsumerObserver | None = None,
    ) -> ConsumerStats:
        """Run jobs one at a time, in hand-over order, until ``stop`` (or empty, with ``burst``);
        consumers sharing the queue never run the same job."""
        consumers = self._shared.consumers
        consumers[self.identity] = consumers.get(self.identity, 0) + 1
        try:
            return await self._consume(function, stop, burst, observer)
        finally:
            consumers[self.identity] -= 1

    async def _consume(
        self, function: JobFunction, stop: asyncio.Event, burst: bool, observer: ConsumerObserver | None
    ) -> ConsumerStats:
        stats = ConsumerStats()
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            if observer is not None:
                observer.beat()
            # A job another consumer runs is not ready: no job runs twice at once.
            idle = [k for k in self._waiting if not self._jobs[k].running]
            ready = [k for k in idle if self._jobs[k].not_before <= loop.time()]
            if not ready:
                if burst and not self._waiting:
                    break
                self._changed.clear()
                waits = [self._jobs[k].not_before - loop.time() for k in idle]
                timeout = max(0.001, min(waits)) if waits else None
                stopper = asyncio.ensure_future(stop.wait())
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({stopper, changed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                changed.cancel()
                continue
            job_id = ready[0]
            entry = self._jobs[job_id]
            if self._foreign(job_id, entry, observer):
                continue
            entry.running = True
            jobs = [Job(row_id, delivery) for row_id, _, delivery in entry.rows]
            try:
                outcomes = await function(jobs)
            finally:
                entry.running = False  # if it raised, the job waits to be run again
                self._changed.set()  # a consumer waiting for this job to end (a burst) looks again
            stats.rows += len(jobs)
            stats.complete += 1
            self._settle(job_id, entry, outcomes, stats)
        return stats

    def _foreign(self, job_id: str, entry: _Entry, observer: ConsumerObserver | None) -> bool:
        """A job of another database: put back untouched, deferred, for its own workers (True)."""
        if not (entry.origin and self.identity) or entry.origin == self.identity:
            return False
        self._jobs.pop(job_id)
        self._waiting.remove(job_id)
        self._add_job(entry.rows, FOREIGN_JOB_DEFER, origin=entry.origin)
        if observer is not None:
            observer.foreign_job(entry.origin, self.identity)
        return True

    def _settle(self, job_id: str, entry: _Entry, outcomes: Sequence[Outcome], stats: ConsumerStats) -> None:
        """After a job ran: drop the markers of the rows that ended, schedule the others again."""
        if self._jobs.pop(job_id, None) is not None:  # gone if everything was lost meanwhile
            self._waiting.remove(job_id)
        put_off: list[tuple[int, str, int]] = []
        for (row_id, marker, delivery), outcome in zip(entry.rows, outcomes, strict=True):
            if self.markers.get(marker) != job_id:
                continue  # scheduled meanwhile by another job
            if outcome.retry_in is None:
                del self.markers[marker]
            elif not outcome.counted:
                put_off.append((row_id, marker, delivery))
            else:
                stats.retried += 1
                self._add_job([(row_id, marker, delivery + 1)], outcome.retry_in, entry.origin or None)
        if put_off:
            self._add_job(put_off, origin=entry.origin or None)


@dataclass(frozen=True)
class MemoryBackend:
    """``memory://NAME``: one :class:`InMemoryQueue` per name in this process, both sides of it.

    For tests and for embedding relay and worker in one process: another process
    sees another queue.
    """

    queue: InMemoryQueue
    name: str = "the in-memory queue"

    def producer(self) -> InMemoryQueue:
        """The relay's side: the queue itself."""
        return self.queue

    def consumer(self) -> InMemoryQueue:
        """A worker's side: the same queue."""
        return self.queue

    def diagnostics(self) -> InMemoryQueue:
        """`doctor`'s view: the queue answers for itself."""
        return self.queue


_QUEUES: dict[str, InMemoryQueue] = {}


def backend(url: str, options: QueueOptions) -> MemoryBackend:
    """The entry point of the ``memory`` scheme: the queue named by the URL (or the queue name),
    as the database of ``options.identity`` sees it."""
    parts = urlsplit(url)
    name = (parts.netloc + parts.path).strip("/") or options.queue_name
    queue = _QUEUES.get(name)
    if queue is None:
        queue = _QUEUES[name] = InMemoryQueue(options.namespace, batch_size=options.batch_size)
    return MemoryBackend(queue.side(options.identity, batch_size=options.batch_size))
