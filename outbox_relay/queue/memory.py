"""The queue port in memory: for fast tests of the relay's and the worker's logic.

Same rules as the arq adapter: a job is known from hand-over until its last
delivery ends (hand-over of a known job adds nothing); a retry runs again after
its delay; :meth:`InMemoryQueue.lose_everything` plays a server restarted empty
(the epoch changes).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from outbox_relay.queue import ConsumerObserver, ConsumerStats, HandOver, Job, JobFunction, PendingJob


@dataclass
class _Entry:
    row_id: int
    delivery: int = 0
    not_before: float = 0.0


class InMemoryQueue:
    """Implements both sides of the port: :class:`~outbox_relay.queue.Queue` and
    :class:`~outbox_relay.queue.Consumer`."""

    _epochs = itertools.count(1)
    server = "the in-memory queue"

    def __init__(self, namespace: str = "memory") -> None:
        self.namespace = namespace
        self._jobs: dict[str, _Entry] = {}
        self._waiting: list[str] = []
        self._epoch = str(next(self._epochs))
        self._changed = asyncio.Event()
        #: Every job id ever added, in order (tests read it).
        self.added: list[str] = []
        self.available = True

    # -- producer side ---------------------------------------------------------------

    def _check(self) -> None:
        if not self.available:
            from outbox_relay.exceptions import QueueUnavailable

            raise QueueUnavailable("the in-memory queue is switched off")

    async def hand_over(self, rows: Sequence[PendingJob]) -> HandOver:
        """Add one job per row whose job is not known yet."""
        self._check()
        added = 0
        for row in rows:
            key = f"{self.namespace}:{row.correlation_id}#{row.generation}"
            if key in self._jobs:
                continue
            self._jobs[key] = _Entry(row.id)
            self._waiting.append(key)
            self.added.append(key)
            added += 1
        if added:
            self._changed.set()
        return HandOver(added, len(self._waiting))

    async def depth(self) -> int:
        """Jobs waiting (deferred retries included)."""
        self._check()
        return len(self._waiting)

    async def epoch(self) -> str:
        """Changes on :meth:`lose_everything`."""
        self._check()
        return self._epoch

    def lose_everything(self) -> None:
        """Forget every job, as a server restarted empty would."""
        self._jobs.clear()
        self._waiting.clear()
        self._epoch = str(next(self._epochs))

    async def close(self) -> None:
        """Nothing to release."""

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
        """Run jobs one at a time, in hand-over order, until ``stop`` (or empty, with ``burst``)."""
        stats = ConsumerStats()
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            if observer is not None:
                observer.beat()
            ready = [k for k in self._waiting if self._jobs[k].not_before <= loop.time()]
            if not ready:
                if burst and not self._waiting:
                    break
                self._changed.clear()
                waits = [self._jobs[k].not_before - loop.time() for k in self._waiting]
                timeout = max(0.001, min(waits)) if waits else None
                stopper = asyncio.ensure_future(stop.wait())
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({stopper, changed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                changed.cancel()
                continue
            key = ready[0]
            entry = self._jobs[key]
            entry.delivery += 1
            outcome = await function(Job(entry.row_id, entry.delivery))
            if outcome.retry_in is not None:
                stats.retried += 1
                entry.not_before = loop.time() + outcome.retry_in
                continue
            self._waiting.remove(key)
            del self._jobs[key]
            stats.complete += 1
        return stats
