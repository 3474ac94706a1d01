"""The queue port: what the relay and the worker need of a job queue, and nothing more.

The relay *hands over* pending rows: the queue packs them into **batches** (one
queue job carries up to ``batch_size`` rows; a hand-over of one row is a job of
one row, so latency at low load is unchanged) and deduplicates each row by
correlation id and generation: a row is never scheduled twice while a job
holding it waits or runs. A row whose earlier job is gone (neither waiting nor
running: lost, or never fully written) is *orphaned* and scheduled again. The
relay reads the queue's *depth* for backpressure and watches its *epoch*, a
token that changes whenever the queue may have lost jobs (its server
restarted empty): then every ``queued`` row is handed over again.

The worker *consumes*: the queue calls a :data:`JobFunction` with a batch of
:class:`Job` (one per row) and acts on the :class:`Outcome` it returns for each
— done (the row's dedupe marker goes), or run that row alone again after a
delay. Attempts are counted in the database, not by the queue.

Every job carries the identity of the service database whose rows it holds
(``QueueOptions.identity``). A consumer never runs a job of another database
(two services given one queue name): it puts the job back untouched, deferred
by :data:`FOREIGN_JOB_DEFER` seconds, so that the right workers still take it,
and tells its observer (:meth:`ConsumerObserver.foreign_job`). A job without
an identity (made before jobs carried one) is run.

Backends implement this port, chosen by the queue URL's scheme
(:mod:`outbox_relay.queue.backends`): arq on Redis (``outbox_relay.arq_adapter``,
the only place those libraries are imported) and :mod:`outbox_relay.queue.memory`,
in memory, for fast tests; one conformance suite (``tests/conformance``) runs
against both. Failures surface as
:class:`~outbox_relay.exceptions.QueueUnavailable` (server unreachable) or
:class:`~outbox_relay.exceptions.QueueError` (server refused).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class PendingJob(Protocol):
    """A row the relay hands over (the relay's store provides these)."""

    @property
    def id(self) -> int: ...
    @property
    def correlation_id(self) -> str: ...
    @property
    def generation(self) -> int: ...


@dataclass(frozen=True, slots=True)
class HandOver:
    """The result of handing rows over: rows really added, the queue's depth after, and how
    many jobs were due and unclaimed when they came (a few at most are looked at: any
    means the workers are behind)."""

    added: int
    depth: int
    unclaimed: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    """One delivery of a row to a worker (within a batch): the row, and the how-many-th delivery."""

    row_id: int
    delivery: int = 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a job: ``result`` (finished, failed, duplicate, missing, retried),
    for ``retried`` the delay before the queue runs it again; for metrics, the row's
    ``kind`` and, once finished, seconds from its ``created_at`` to its ``finished_at``."""

    result: str
    retry_in: float | None = None
    kind: str | None = None
    commit_to_finish: float | None = None
    #: For a retry: whether this delivery counts (False: the row was put off unstarted).
    counted: bool = True

    @classmethod
    def retry(cls, delay: float, kind: str | None = None) -> Outcome:
        """Run the row again after ``delay`` seconds."""
        return cls("retried", delay, kind)

    @classmethod
    def put_off(cls) -> Outcome:
        """The batch ran out of time before this row started: run it again at once."""
        return cls("put off", 0.0, counted=False)


#: The job-function contract: the worker's processor applies a batch of rows and
#: returns one outcome per row, in order.
JobFunction = Callable[[Sequence[Job]], Awaitable[list[Outcome]]]


class Queue(Protocol):
    """The producer side, used by the relay."""

    #: What to call the queue's server in messages ("Redis").
    server: str

    async def hand_over(self, rows: Sequence[PendingJob]) -> HandOver:
        """Enqueue ``rows`` as batches in one round trip, all or nothing; a row whose job is
        known (waiting or running) is not added again. ``added`` counts rows."""
        ...

    async def depth(self) -> int:
        """Jobs waiting (including deferred retries); a job holds up to ``batch_size`` rows."""
        ...

    async def epoch(self) -> str:
        """A token that changes when the queue may have lost jobs."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass
class ConsumerStats:
    """What a consumer ran."""

    complete: int = 0
    failed: int = 0
    retried: int = 0
    #: Rows applied (a job is a batch of rows).
    rows: int = 0


class ConsumerObserver(Protocol):
    """Told by a consumer how its loop fares (health): it turned over, lost its server, or
    refused a job of another service database (``job_database`` and ``own``: identities)."""

    def beat(self) -> None: ...
    def not_ready(self, reason: str) -> None: ...
    def foreign_job(self, job_database: str, own: str) -> None: ...


class Consumer(Protocol):
    """The worker side: runs a :data:`JobFunction` for each job until ``stop``."""

    #: What to call the queue's server in messages ("Redis").
    server: str

    async def wait_until_ready(self, stop: asyncio.Event) -> None:
        """Return once the queue's server answers (retrying until then), or when ``stop`` is set."""
        ...

    async def run(
        self,
        function: JobFunction,
        stop: asyncio.Event,
        *,
        burst: bool = False,
        observer: ConsumerObserver | None = None,
    ) -> ConsumerStats:
        """Run jobs until ``stop`` (or, with ``burst``, until the queue is empty)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


#: Seconds a job refused as another database's waits before any worker may take it again.
FOREIGN_JOB_DEFER = 1.0


def split_batches(count: int, batch_size: int) -> list[int]:
    """Sizes of the batches ``count`` rows are packed into: as few as ``batch_size``
    allows, as even as possible (``count`` 1 gives one batch of 1)."""
    if count <= 0:
        return []
    batches = -(-count // batch_size)
    base, extra = divmod(count, batches)
    return [base + 1 if i < extra else base for i in range(batches)]


# -- what a queue backend says of itself for `doctor` ---------------------------------------------

from outbox_relay.diagnosis import Check  # noqa: E402  (kept with the section that uses it)


@dataclass(frozen=True)
class Diagnosis:
    """What a queue backend says of itself for `doctor`."""

    #: The server's own lines, e.g. "redis", "redis maxmemory-policy".
    checks: tuple[Check, ...]
    reachable: bool
    #: How a live worker showed itself (e.g. "a worker refreshed KEY (valid 40 s more): VALUE"),
    #: None when none did.
    workers_seen: str | None
    #: What was looked at, e.g. "outbox_relay:health-check", for the "no worker refreshed ..." lines.
    workers_signal: str
    #: What to call the queue's server in doctor's lines ("Redis").
    server: str = "the queue's server"
    #: The queue server's clock minus this host's, in seconds (read at the middle of a round
    #: trip): the clock the queue's timing goes by. None: not known.
    clock_offset: float | None = None
    #: The identities of the databases whose jobs wait in the queue (the first 100 jobs), with
    #: how many of those jobs each has; jobs without an identity are not counted.
    job_databases: Mapping[str, int] = field(default_factory=dict)
    #: The identities of the databases the live workers of this queue serve.
    worker_databases: tuple[str, ...] = ()


class Diagnosable(Protocol):
    """A queue backend `doctor` can ask about itself (reads only, never raises for what it finds)."""

    async def diagnose(self) -> Diagnosis: ...
