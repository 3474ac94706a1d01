"""The queue port (:mod:`outbox_relay.queue`) implemented with arq on Redis.

This package is the only place in outbox_relay that imports arq or redis:
the producer (:class:`ArqQueue`, used by the relay), the consumer
(:class:`ArqConsumer`, used by the worker) and what `doctor` reads of Redis
(:class:`ArqDiagnostics`), composed as a queue backend (:func:`backend`).
"""

from __future__ import annotations

from outbox_relay.arq_adapter.backend import ArqBackend, backend
from outbox_relay.arq_adapter.consumer import ArqConsumer, ConsumerConfig
from outbox_relay.arq_adapter.diagnose import ArqDiagnostics
from outbox_relay.arq_adapter.producer import ArqQueue, QueueConfig, job_id

__all__ = [
    "ArqBackend",
    "ArqConsumer",
    "ArqDiagnostics",
    "ArqQueue",
    "ConsumerConfig",
    "QueueConfig",
    "backend",
    "job_id",
]
