"""The arq adapter as a queue backend (``redis://``, ``rediss://``, ``unix://``, and a Sentinel set:
``redis+sentinel://``, ``rediss+sentinel://``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from outbox_relay.arq_adapter.connection import check_redis_url
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

    def __post_init__(self) -> None:
        check_redis_url(self.url)  # a malformed Sentinel URL is refused when the backend is made

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


class _Factory:
    """The entry point of the ``redis``, ``rediss``, ``unix``, ``redis+sentinel`` and
    ``rediss+sentinel`` schemes (a :data:`~outbox_relay.queue.backends.BackendFactory`)."""

    def __call__(self, url: str, options: QueueOptions) -> ArqBackend:
        return ArqBackend(url, options)

    @staticmethod
    def check_url(url: str) -> None:
        """A ``ValueError`` for a malformed Sentinel URL (settings validation)."""
        check_redis_url(url)


backend = _Factory()
