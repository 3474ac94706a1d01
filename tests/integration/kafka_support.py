"""Shared pieces of the Kafka tests: the broker fixture, topics, and reading a topic back."""

from __future__ import annotations

import asyncio

from confluent_kafka.admin import AdminClient

from outbox_relay.devtools.kafka_server import (
    Record,
    client_config,
    create_topics_now,
    read_topic_now,
)


async def create_topics(
    bootstrap: str, topics: list[str], partitions: int = 3, *, exist_ok: bool = False
) -> None:
    """:func:`create_topics_now` off the event loop."""
    await asyncio.to_thread(create_topics_now, bootstrap, topics, partitions, exist_ok=exist_ok)


def topic_names(bootstrap: str) -> set[str]:
    """The topics the broker's metadata lists."""
    admin = AdminClient(client_config(bootstrap))
    return set(admin.list_topics(timeout=10).topics)


async def read_topic(bootstrap: str, topic: str) -> list[Record]:
    """:func:`read_topic_now` off the event loop."""
    return await asyncio.to_thread(read_topic_now, bootstrap, topic)
