"""`demo --sink nats`: outbox rows routed to NATS JetStream, on embedded servers, messages shown arriving.

Embedded PostgreSQL (one service database, the direct shape), Redis and a
nats-server with JetStream; a stream on ``outbox.>``; the relay and worker
processes with ``OUTBOX_RELAY_ROUTES=demo.*=nats``. Producers insert events; a
JetStream consumer of the demo's own prints the first messages as they arrive
and counts the rest. The checks: every row finished, the stream holds each
event exactly once, the event JSON as the contract says.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from outbox_relay.composition import plugins
from outbox_relay.db import connect
from outbox_relay.devtools.embedded import EmbeddedPostgres, EmbeddedRedis
from outbox_relay.devtools.nats_server import EmbeddedNats
from outbox_relay.devtools.processes import log_tails, service_env, spawn
from outbox_relay.devtools.processes import stop as stop_processes
from outbox_relay.devtools.setup import prepare
from outbox_relay.exceptions import DemoError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.settings import Settings
from outbox_relay.sinks.routes import parse_routes
from outbox_relay.terminal import escape_controls as printable

STREAM = "OUTBOX_DEMO"
ROUTES = "demo.*=nats"
SHOWN = 5


def say(text: str = "") -> None:
    """Print a line of the narrative at once."""
    print(text, flush=True)


async def run_nats_demo(events: int, workers: int) -> int:
    """Run the NATS demo; 0 when every check passed."""
    import nats
    from nats.js.api import StreamConfig

    workdir = Path(tempfile.mkdtemp(prefix="outbox-relay-demo-nats-"))
    (workdir / "postgres").mkdir()
    (workdir / "redis").mkdir()
    say("outbox_relay demo, sink nats: embedded PostgreSQL + Redis + nats-server (JetStream)")
    pg = EmbeddedPostgres(workdir / "postgres")
    redis = EmbeddedRedis(workdir / "redis")
    broker = EmbeddedNats(store=workdir / "nats")
    (workdir / "nats").mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    ok = False
    try:
        pg.start()
        redis.start()
        broker.start()
        say(f"  servers up (nats-server on 127.0.0.1:{broker.port}, JetStream store in the demo's dir)")
        settings = Settings(
            database_url=SecretStr(pg.create_database("service")),
            redis_url=SecretStr(redis.url()),
            queue_name="demo_nats",
            routes=parse_routes(ROUTES),
        )
        registry = plugins(settings, HandlerRegistry())
        await prepare(settings, registry.plugins())
        client = await nats.connect(broker.url)
        try:
            js = client.jetstream()
            await js.add_stream(StreamConfig(name=STREAM, subjects=["outbox.>"]))
            say(f"  stream {STREAM} on outbox.> created; routes: {ROUTES}")
            ok = await _flow(events, workers, settings, broker.url, js, workdir, processes)
        finally:
            await client.close()
    finally:
        stop_processes(processes, timeout=15)
        broker.cleanup()
        redis.cleanup()
        pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    say("demo passed: every event in the stream exactly once" if ok else "demo FAILED: see the checks above")
    say("cleaned up: servers stopped, files removed")
    return 0 if ok else 1


async def _flow(
    events: int,
    workers: int,
    settings: Settings,
    nats_url: str,
    js: Any,
    workdir: Path,
    processes: list[subprocess.Popen[bytes]],
) -> bool:
    env = service_env(settings)
    env.update({"OUTBOX_RELAY_ROUTES": ROUTES, "OUTBOX_RELAY_NATS_URL": nats_url})
    processes.append(spawn(["-m", "outbox_relay", "run"], env, workdir / "relay.log"))
    for index in range(workers):
        processes.append(spawn(["-m", "outbox_relay", "worker"], env, workdir / f"worker-{index}.log"))
    say(f"  relay and {workers} worker processes started")

    seen: dict[str, int] = {}

    async def on_message(msg: Any) -> None:
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "?")
        seen[msg_id] = seen.get(msg_id, 0) + 1
        if len(seen) <= SHOWN and seen[msg_id] == 1:
            say(f"    ← {printable(msg.subject)} {printable(msg.data.decode())}")
        await msg.ack()

    subscription = await js.subscribe("outbox.>", stream=STREAM, cb=on_message, manual_ack=True)
    n = events
    service = await connect(settings.require_database_url())
    started = time.monotonic()
    try:
        say(f"  producing {n} events (kinds demo.order_placed / demo.order_paid); the first arriving:")
        await service.execute(
            "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload)"
            " SELECT 'demo-' || i, CASE WHEN i % 2 = 0 THEN 'demo.order_placed' ELSE 'demo.order_paid' END,"
            "        'success', jsonb_build_object('order', i, 'amount', i % 97 + 1)"
            " FROM generate_series(1, $1::int) AS i",
            n,
        )
        deadline = time.monotonic() + 120
        last_shown = 0.0
        while True:
            finished = int(
                await service.fetchval("SELECT count(*) FROM outbox_relay.outbox WHERE status = 'finished'")
            )
            if finished >= n and len(seen) >= n:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                logs = await asyncio.to_thread(log_tails, workdir)
                raise DemoError(f"the flow stalled at {finished}/{n} rows finished\n{logs}")
            if time.monotonic() - last_shown >= 1.0 and len(seen) > SHOWN:
                say(f"    … {len(seen)} messages received, {finished} rows finished")
                last_shown = time.monotonic()
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        failed = int(
            await service.fetchval("SELECT count(*) FROM outbox_relay.outbox WHERE status = 'failed'")
        )
    finally:
        await service.close()
        await subscription.unsubscribe()
    info = await js.stream_info(STREAM)
    sample = await js.get_msg(STREAM, info.state.first_seq)
    event = json.loads(sample.data)
    checks = [
        (
            failed == 0 and info.state.messages == n,
            f"{n} rows finished, {info.state.messages} messages in the stream",
        ),
        (len(seen) == n, f"{len(seen)} distinct Nats-Msg-Id received (= correlation ids)"),
        (
            set(event) == {"correlation_id", "kind", "outcome", "payload", "created_at"},
            "event JSON: correlation_id, kind, outcome, payload, created_at",
        ),
    ]
    say()
    say(f"summary: {n} events → JetStream in {elapsed:.2f} s ({n / elapsed:.0f} events/s end to end)")
    for passed, text in checks:
        say(f"  [{'ok' if passed else 'FAILED'}] {text}")
    say()
    return all(passed for passed, _ in checks)
