"""The arq adapter as a queue backend (``redis://``, ``rediss://``, ``unix://``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from outbox_relay.arq_adapter.consumer import ArqConsumer, ConsumerConfig
from outbox_relay.arq_adapter.diagnose import ArqDiagnostics
from outbox_relay.arq_adapter.producer import ArqQueue, QueueConfig
from outbox_relay.queue.backends import QueueOptions


@dataclass(frozen=True)
class ArqBackend:
    """arq on Redis: the relay's :class:`ArqQueue`, a worker's :class:`ArqConsumer`."""

    url: str = field(repr=False)
    options: QueueOptions
    name: str = "Redis"

    def producer(self) -> ArqQueue:
        """The relay's side."""
        return ArqQueue(
            QueueConfig(
                self.url,
                self.options.queue_name,
                self.options.namespace,
                batch_size=self.options.batch_size,
                identity=self.options.identity,
            )
        )

    def consumer_config(self) -> ConsumerConfig:
        """How a worker's arq Worker is set up (the bench's no-op worker uses the same)."""
        return ConsumerConfig(
            redis_url=self.url,
            queue_name=self.options.queue_name,
            concurrency=self.options.concurrency,
            poll_delay=self.options.poll_delay,
            job_timeout=self.options.job_timeout,
            idle_wait=self.options.idle_wait,
            identity=self.options.identity,
        )

    def consumer(self) -> ArqConsumer:
        """A worker's side."""
        return ArqConsumer(self.consumer_config())

    def diagnostics(self) -> ArqDiagnostics:
        """What `doctor` asks of Redis."""
        return ArqDiagnostics(self.url, self.options.queue_name)


def backend(url: str, options: QueueOptions) -> ArqBackend:
    """The entry point of the ``redis``, ``rediss`` and ``unix`` schemes."""
    return ArqBackend(url, options)
