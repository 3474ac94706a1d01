"""What the relay and the worker report, as named events: one small call at each obvious point.

The services hold a :class:`RelayHooks` / :class:`WorkerHooks` built from an
optional :class:`Health` and :class:`Metrics`; with neither (no HTTP port) every
call does nothing, so the services need no ``if`` of their own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Iterator, Sequence

from prometheus_client import Counter

from outbox_relay.observability.health import Health
from outbox_relay.observability.metrics import EVENT_RESULTS, Metrics, Role
from outbox_relay.queue import Job, JobFunction, Outcome

logger = logging.getLogger(__name__)

#: Seconds a service loop may go without turning over before /healthz says it is stuck.
DEFAULT_DEADLINE = 30.0
#: The ``kind`` label of a row whose kind no handler is registered for (labels stay bounded).
OTHER_KIND = "other"
#: Seconds a worker stays not ready after it refused a job of another service database.
FOREIGN_HOLD = 60.0
#: Least seconds between two ERROR lines about refused jobs (the metric counts each).
FOREIGN_LOG_EVERY = 10.0


class _Hooks:
    """What both roles report: one loop's heartbeat and waits, readiness with its role, the metrics."""

    #: The loop's name on /healthz.
    LOOP: str
    #: The metrics role this process serves (a :class:`Metrics` of another role is refused).
    ROLE: Role

    def __init__(
        self, health: Health | None, metrics: Metrics | None, *, deadline: float, starting: str, role: str
    ) -> None:
        if metrics is not None and metrics.role != self.ROLE:
            raise ValueError(
                f"{type(self).__name__} needs the {self.ROLE}'s metrics, not the {metrics.role}'s"
            )
        self.health = health
        self.metrics = metrics
        if health is not None:
            health.register(self.LOOP, deadline)
            health.set_ready(False, reasons=[starting], role=role)

    def beat(self) -> None:
        """The loop turned over."""
        if self.health is not None:
            self.health.beat(self.LOOP)

    @contextlib.contextmanager
    def waiting(self, on: str) -> Iterator[None]:
        """The loop retries ``on`` (unreachable): alive, not ready meanwhile."""
        if self.health is None:
            yield
            return
        with self.health.waiting(self.LOOP, on):
            yield

    def _turned(self, ready: bool, *, role: str | None, reason: str | None = None) -> None:
        """The loop turned over and found itself ``ready`` (or not, for ``reason``) as ``role``."""
        if self.health is not None:
            self.health.beat(self.LOOP)
            self.health.set_ready(ready, reasons=[reason] if reason else (), role=role)


class RelayHooks(_Hooks):
    """Liveness, readiness and metrics of one relay (loop ``relay``)."""

    LOOP = "relay"
    ROLE = "relay"

    def __init__(
        self,
        health: Health | None = None,
        metrics: Metrics | None = None,
        *,
        deadline: float = DEFAULT_DEADLINE,
    ) -> None:
        super().__init__(
            health, metrics, deadline=deadline, starting="connecting to the service database", role="standby"
        )
        self._set_active(0)
        self._dropped: dict[str, Counter] = {}

    def _set_active(self, value: int) -> None:
        if self.metrics is not None:
            self.metrics.relay_active.set(value)

    def reachable(self, what: str, ok: bool) -> None:
        """The active relay's periodic check of ``what`` (the queue's server): not ready while it fails."""
        if self.health is None:
            return
        readiness = self.health.readiness()
        if not ok:
            self.health.set_ready(False, reasons=[f"{what} unreachable; retrying"])
        elif not readiness.ready and readiness.role == "active":
            self.health.set_ready(True)

    def standby(self) -> None:
        """Another relay holds the lock; this one polls to take over."""
        self._turned(True, role="standby")
        self._set_active(0)

    def active(self) -> None:
        """This relay holds the lock and hands rows over."""
        self._turned(True, role="active")
        self._set_active(1)

    def session_ended(self, error: str) -> None:
        """The session failed (listener lost, database or queue away): reconnecting."""
        self._turned(False, role="standby", reason=f"relay session ended ({error}); reconnecting")
        self._set_active(0)
        if self.metrics is not None:
            self.metrics.listener_reconnects.inc()

    def inactive(self) -> None:
        """The session is over (stopping, or before a reconnect)."""
        self._set_active(0)

    def handed_over(self, path: str, rows: int) -> None:
        """``rows`` went to the queue; ``path`` is ``notify`` or ``sweep``."""
        self.beat()
        if self.metrics is not None and rows:
            self.metrics.handed_over.labels(path=path).inc(rows)

    def swept_unnotified(self, rows: int) -> None:
        """The sweep found ``rows`` new rows that no notification had brought."""
        if self.metrics is not None and rows:
            self.metrics.sweep_missed_notify.inc(rows)

    def notification_dropped(self, reason: str) -> None:
        """The relay dropped a notification for ``reason`` (a fixed set: no payload is a label)."""
        if self.metrics is not None:  # a flood calls this thousands of times a second: no labels() call
            child = self._dropped.get(reason)
            if child is None:
                child = self._dropped[reason] = self.metrics.notifications_dropped.labels(reason=reason)
            child.inc()

    def listener_reset(self) -> None:
        """The notification listener fell behind (a flood) and was replaced, its backlog dropped."""
        if self.metrics is not None:
            self.metrics.listener_resets.inc()

    def queue_depth(self, depth: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(depth)


class WorkerHooks(_Hooks):
    """Liveness, readiness and metrics of one worker process (loop ``worker``)."""

    LOOP = "worker"
    ROLE = "worker"

    def __init__(
        self,
        health: Health | None = None,
        metrics: Metrics | None = None,
        *,
        kinds: Collection[str] = (),
        deadline: float = DEFAULT_DEADLINE,
    ) -> None:
        super().__init__(
            health,
            metrics,
            deadline=deadline,
            starting="connecting to the service database and Redis",
            role="worker",
        )
        self.kinds = frozenset(kinds)
        self._foreign_until: float = -1e9
        self._next_foreign_log: float = -1e9
        self._foreign_unlogged: int = 0
        if metrics is not None:
            metrics.worker_up.set_function(self.up)
            for kind in sorted({*self.kinds, OTHER_KIND}):  # at 0 from the start: increase() sees the first
                for result in EVENT_RESULTS:
                    metrics.events.labels(kind=kind, result=result)

    def up(self) -> float:
        """1.0 while this worker is live and ready (``outbox_relay_worker_up``), else 0.0."""
        if self.health is None:
            return 1.0  # metrics without /healthz: nothing says otherwise while the process runs
        return 1.0 if self.health.liveness().ok and self.health.readiness().ready else 0.0

    def beat(self) -> None:
        """The queue's poll loop turned over (arq's ``heart_beat``): alive, and the server answered
        (ready again, unless it refused another database's job in the last FOREIGN_HOLD s)."""
        super().beat()
        refusing = time.monotonic() < self._foreign_until
        if self.health is not None and not refusing and not self.health.readiness().ready:
            self.health.set_ready(True, role="worker")

    def foreign_job(self, job_database: str, own: str) -> None:
        """The queue held a job of another service database: refused and put back for its own
        workers. Counted, logged (an ERROR at most every FOREIGN_LOG_EVERY s) and not ready."""
        now = time.monotonic()
        self._foreign_until = now + FOREIGN_HOLD
        self._foreign_unlogged += 1
        if self.metrics is not None:
            self.metrics.foreign_jobs.inc()
        self._turned(
            False,
            role="worker",
            reason=f"refusing jobs of another service database ({job_database}; this worker's is {own}) "
            "on its queue: give each service database its own queue (unset OUTBOX_RELAY_QUEUE_NAME)",
        )
        if now >= self._next_foreign_log:
            logger.error(
                "refused a job of another service database: two services share this queue name; "
                "the job is put back for that database's workers",
                extra={
                    "event": "foreign_job",
                    "job_database": job_database,
                    "worker_database": own,
                    "refused": self._foreign_unlogged,
                },
            )
            self._next_foreign_log = now + FOREIGN_LOG_EVERY
            self._foreign_unlogged = 0

    def ready(self) -> None:
        self._turned(True, role="worker")

    def not_ready(self, reason: str) -> None:
        self._turned(False, role="worker", reason=reason)

    def label(self, kind: str | None) -> str:
        """A bounded ``kind`` label: a registered kind, else ``other``."""
        return kind if kind is not None and kind in self.kinds else OTHER_KIND

    def instrument(self, function: JobFunction) -> JobFunction:
        """``function`` (the queue port's job function, a batch of rows), counting each row's
        outcome by kind, timing attempts (a batch's time shared evenly among its rows), and
        observing commit→finished of each row it finished (the processor reports both in
        its :class:`~outbox_relay.queue.Outcome`: no extra query)."""
        metrics = self.metrics
        if metrics is None:
            return function

        async def observed(jobs: Sequence[Job]) -> list[Outcome]:
            metrics.jobs_in_flight.inc(len(jobs))
            started = time.perf_counter()
            try:
                outcomes = await function(jobs)
            finally:
                metrics.jobs_in_flight.dec(len(jobs))
            per_row = (time.perf_counter() - started) / max(1, len(jobs))
            for outcome in outcomes:
                label = self.label(outcome.kind)
                if not outcome.counted:
                    continue  # put off unstarted: no attempt was made
                metrics.handler_duration.labels(kind=label).observe(per_row)
                if outcome.retry_in is not None:
                    metrics.events.labels(kind=label, result="retried").inc()
                    metrics.retries.labels(kind=label).inc()
                elif outcome.result in ("finished", "failed"):
                    metrics.events.labels(kind=label, result=outcome.result).inc()
                if outcome.result == "finished" and outcome.commit_to_finish is not None:
                    metrics.commit_to_finish.labels(kind=label).observe(max(0.0, outcome.commit_to_finish))
            return outcomes

        return observed
