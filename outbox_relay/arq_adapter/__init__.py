"""The queue port (:mod:`outbox_relay.queue`) implemented with arq on Redis.

This package is the only place in outbox_relay that imports arq or redis:
the producer (:class:`ArqQueue`, used by the relay) and the consumer
(:class:`ArqConsumer`, used by the worker).
"""

from __future__ import annotations

from outbox_relay.arq_adapter.consumer import ArqConsumer, ConsumerConfig
from outbox_relay.arq_adapter.facts import redis_facts
from outbox_relay.arq_adapter.producer import ArqQueue, QueueConfig, job_id

__all__ = [
    "ArqConsumer",
    "ArqQueue",
    "ConsumerConfig",
    "QueueConfig",
    "job_id",
    "redis_facts",
]
