"""Shared pieces of the Kafka tests: the broker fixture, topics, and reading a topic back."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic


def client_config(bootstrap: str, **more: Any) -> dict[str, Any]:
    """A test client's configuration: librdkafka's own lines go to logging, not stderr."""
    return {"bootstrap.servers": bootstrap, "logger": logging.getLogger("tests.kafka"), **more}


def create_topics_now(
    bootstrap: str, topics: list[str], partitions: int = 3, *, exist_ok: bool = False
) -> None:
    """Create ``topics`` (blocking); the AdminClient stays referenced until its futures resolve."""
    admin = AdminClient(client_config(bootstrap))
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics]
    )
    for future in futures.values():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            if not (exist_ok and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise
    del admin


async def create_topics(
    bootstrap: str, topics: list[str], partitions: int = 3, *, exist_ok: bool = False
) -> None:
    """:func:`create_topics_now` off the event loop."""
    await asyncio.to_thread(create_topics_now, bootstrap, topics, partitions, exist_ok=exist_ok)


def topic_names(bootstrap: str) -> set[str]:
    """The topics the broker's metadata lists."""
    admin = AdminClient(client_config(bootstrap))
    return set(admin.list_topics(timeout=10).topics)


@dataclass(frozen=True)
class Record:
    """One record read back."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


#: The header of the test's own fence records (see :func:`fence`).
FENCE = "test-fence"


def fence(bootstrap: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """Write one fence record to each partition; partition -> its offset.

    Every record written before it lies below it: reading up to the fence reads all of them. (tansu's
    high watermark after a batch of several records is that batch's first offset + 1, so the
    watermarks cannot say where a partition ends.)
    """
    producer = Producer(client_config(bootstrap))
    offsets: dict[int, int] = {}

    def reported(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            raise AssertionError(f"fence record for {topic}: {err}")
        offset = msg.offset()
        assert offset is not None
        offsets[msg.partition() or 0] = offset

    for partition in partitions:
        producer.produce(topic, b"", partition=partition, headers=[(FENCE, b"1")], on_delivery=reported)
    if producer.flush(30) > 0 or len(offsets) != len(partitions):
        raise AssertionError(f"fence records for {topic} not written: {offsets}")
    return offsets


def read_topic_now(bootstrap: str, topic: str) -> list[Record]:
    """Every record of ``topic`` (fences left out) in partition then offset order: by ``assign()`` on
    each partition (consumer-group joins hang on tansu) up to a :func:`fence` written first."""
    consumer = Consumer(client_config(bootstrap, **{"group.id": "tests", "enable.auto.commit": False}))
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = fence(bootstrap, topic, partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Record] = []
        remaining = set(partitions)
        while remaining:
            msg = consumer.poll(10)
            if msg is None:
                raise AssertionError(f"no record within 10 s; still reading partitions {sorted(remaining)}")
            if msg.error() is not None:
                raise AssertionError(f"reading {topic}: {msg.error()}")
            partition, offset = msg.partition() or 0, msg.offset() or 0
            raw = msg.headers() or []
            pairs = raw.items() if isinstance(raw, dict) else raw
            headers = {k: v if isinstance(v, bytes) else b"" for k, v in pairs}
            if offset >= ends[partition]:
                remaining.discard(partition)
            elif FENCE not in headers:
                records.append(Record(partition, offset, msg.key(), msg.value() or b"", headers))
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


async def read_topic(bootstrap: str, topic: str) -> list[Record]:
    """:func:`read_topic_now` off the event loop."""
    return await asyncio.to_thread(read_topic_now, bootstrap, topic)
