"""The ``rabbitmq`` route: the machine's RabbitMQ, a durable topic exchange and queue of the bench's own.

The broker is ``--rabbitmq-url``, else ``OUTBOX_RELAY_TEST_RABBITMQ_URL``, else
guest/guest at 127.0.0.1:5672 (what these machines and CI run). The exchange and
queue are named after the run and deleted after it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from bench.sinks import Destination, SinkRoute, Unavailable
from outbox_relay.logs import describe

ENV = "OUTBOX_RELAY_TEST_RABBITMQ_URL"
LOCAL = "amqp://guest:guest@127.0.0.1:5672/"
#: Seconds to wait for the broker to answer before the route is skipped.
CONNECT_TIMEOUT = 5.0


def broker_url(given: str | None) -> str:
    """The broker the route publishes to."""
    return given or os.environ.get(ENV) or LOCAL


def _address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5672}"


def route(url: str | None = None) -> SinkRoute:
    """Publisher confirms, mandatory, persistent messages into a durable queue."""
    amqp = broker_url(url)

    @asynccontextmanager
    async def _open(workdir: Path, tag: str) -> AsyncIterator[Destination]:
        try:
            import aio_pika
        except ImportError as exc:  # the `rabbitmq` extra not installed
            raise Unavailable(str(exc)) from None
        try:
            connection = await aio_pika.connect(amqp, timeout=CONNECT_TIMEOUT)
        except Exception as exc:
            raise Unavailable(f"RabbitMQ at {_address(amqp)} does not answer: {describe(exc)}") from None
        name = f"outbox_bench_{tag}"
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(name, durable=True)
            await queue.bind(exchange, "#")
            try:

                async def count() -> int:
                    declared = await channel.declare_queue(name, passive=True)
                    return int(declared.declaration_result.message_count or 0)

                env = {"OUTBOX_RELAY_RABBITMQ_URL": amqp, "OUTBOX_RELAY_RABBITMQ_EXCHANGE": name}
                yield Destination(env, count, urlsplit(amqp).port or 5672)
            finally:
                await queue.delete(if_unused=False, if_empty=False)
                await exchange.delete()
        finally:
            await connection.close()

    return SinkRoute(
        "rabbitmq", "rabbitmq", f"rabbitmq ({_address(amqp)}, confirms, persistent, durable queue)", _open
    )
