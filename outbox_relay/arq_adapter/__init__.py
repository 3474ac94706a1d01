"""The queue port (:mod:`outbox_relay.queue`) implemented with arq on Redis.

This package is the only place in outbox_relay that imports arq or redis:
the producer (:class:`ArqQueue`, used by the relay), the consumer
(:class:`ArqConsumer`, used by the worker), what `doctor` reads of Redis
(:class:`ArqDiagnostics`) and the bench's raw no-op worker.
"""

from __future__ import annotations

from outbox_relay.arq_adapter.backend import ArqBackend, backend
from outbox_relay.arq_adapter.consumer import ArqConsumer, ConsumerConfig, run_noop_worker
from outbox_relay.arq_adapter.diagnose import ArqDiagnostics
from outbox_relay.arq_adapter.producer import ArqQueue, QueueConfig, enqueue_raw_jobs, job_id

__all__ = [
    "ArqBackend",
    "ArqConsumer",
    "ArqDiagnostics",
    "ArqQueue",
    "ConsumerConfig",
    "QueueConfig",
    "backend",
    "enqueue_raw_jobs",
    "job_id",
    "run_noop_worker",
]
