"""Shared pieces of the sink tests: a real nats-server, a real aiohttp receiver, routed registries."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
from aiohttp import web
from nats.js.api import StreamConfig

from outbox_relay.composition import plugins
from outbox_relay.devtools.embedded import free_port
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.migrate import migrate
from outbox_relay.settings import Settings
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env, count_status, running_relay

SECRET = "whsec_" + base64.b64encode(b"outbox-relay-test-secret-32bytes").decode()

#: What answers an endpoint's POST /hook.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routed_registry(settings: Settings, **plugin_settings: dict[str, Any]) -> HandlerRegistry:
    """What the CLI's edge builds: the installed plugins with their settings (``nats={"url": ...}``
    as if from OUTBOX_RELAY_NATS_URL), then ROUTES' sinks."""
    return plugins(settings, HandlerRegistry(), overrides=plugin_settings)


async def migrate_sinks(service_url: str, registry: HandlerRegistry) -> None:
    """Apply the sinks' migration set (the core's and the reservation set are there already)."""
    conn = await asyncpg.connect(service_url)
    try:
        await migrate(conn, "service", registry.plugins())
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[Any]:
    """A JetStream context of the test's own client."""
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        yield client.jetstream(timeout=10)
    finally:
        await client.close()


async def make_stream(url: str, subjects: list[str]) -> str:
    """Create a stream for ``subjects``; its name."""
    name = f"T{uuid.uuid4().hex[:12]}"
    async with jetstream(url) as js:
        await js.add_stream(StreamConfig(name=name, subjects=subjects))
    return name


async def stream_messages(url: str, stream: str) -> int:
    """How many messages the stream holds."""
    async with jetstream(url) as js:
        info = await js.stream_info(stream)
        return int(info.state.messages)


async def stream_contents(url: str, stream: str) -> list[tuple[str, dict[str, str], bytes]]:
    """Every message of the stream: subject, headers, data."""
    found = []
    async with jetstream(url) as js:
        info = await js.stream_info(stream)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            found.append((msg.subject, dict(msg.headers or {}), msg.data or b""))
    return found


@dataclass
class Receiver:
    """A real HTTP server: records every request; answers by ``script`` (per webhook-id) or 200."""

    port: int = field(default_factory=free_port)
    requests: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    #: webhook-id -> statuses (with optional Retry-After) for its first requests, then 200.
    script: dict[str, list[tuple[int, str | None]]] = field(default_factory=dict)
    #: webhook-id -> seconds to stall its first request (a timeout)
    stall: dict[str, float] = field(default_factory=dict)
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def for_id(self, webhook_id: str) -> list[tuple[float, dict[str, str], bytes]]:
        return [r for r in self.requests if r[1].get("webhook-id") == webhook_id]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        wid = headers.get("webhook-id", "")
        self.requests.append((asyncio.get_running_loop().time(), headers, body))
        delay = self.stall.pop(wid, None)
        if delay is not None:
            await asyncio.sleep(delay)  # the server being slow: the client's timeout is under test
        steps = self.script.get(wid)
        if steps:
            status, retry_after = steps.pop(0)
            extra = {"Retry-After": retry_after} if retry_after else {}
            return web.Response(status=status, headers=extra)
        return web.Response(status=200)

    async def start(self) -> None:
        """Listen on 127.0.0.1 at :attr:`port` (again, after :meth:`stop`: the same port)."""
        if self._runner is None:
            self._runner = await _listen(self.handle, self.port)

    async def stop(self) -> None:
        """Stop listening and close every connection (connections to the port are refused)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def _listen(handler: Handler, port: int) -> web.AppRunner:
    """An endpoint answering POST /hook with ``handler`` on 127.0.0.1:``port``, listening."""
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """An endpoint answering POST /hook with ``handler`` on a free loopback port, for the block: its URL."""
    port = free_port()
    runner = await _listen(handler, port)
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """Run a :class:`Receiver` on 127.0.0.1 for the block."""
    receiver = Receiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def insert_events(conn: Any, prefix: str, n: int, kind: str = "ev.created") -> list[str]:
    """Insert ``n`` rows of ``kind`` straight into the service outbox (the direct shape); their ids."""
    cids = [f"{prefix}-{i}" for i in range(n)]
    await conn.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload)"
        " SELECT c, $2, 'success', jsonb_build_object('n', i)"
        " FROM unnest($1::text[]) WITH ORDINALITY AS t(c, i)",
        cids,
        kind,
    )
    return cids


async def all_finished(service: Any, n: int) -> bool:
    """Whether all ``n`` rows are finished."""
    return await count_status(service, "finished") == n


async def worker_killed_mid_stream(
    outbox_env: OutboxEnv,
    service: Any,
    sink_env: Mapping[str, str],
    directory: Path,
    *,
    rows: int,
    started: Callable[[], Awaitable[bool]],
    what: str,
) -> None:
    """With a relay running: a `worker` process (``sink_env``: ROUTES and the sink's variables,
    JOB_TIMEOUT 2 s, 4 jobs) until ``started`` (``what``), SIGKILLed before it finished all
    ``rows``; then another until every row finished, none failed."""
    settings = outbox_env.settings(routes=sink_env["ROUTES"], requeue_after=3.0, job_timeout=2.0)
    env = cli_env(outbox_env.env(JOB_TIMEOUT="2", WORKER_CONCURRENCY="4", LOG_LEVEL="WARNING", **sink_env))
    services = Services(directory)
    try:
        async with running_relay(settings):
            first = services.start("worker-1", "worker", env=env)
            await services.wait(started, timeout=60, message=what)
            first.proc.kill()
            first.proc.wait(10)
            assert await count_status(service, "finished") < rows, (
                "the worker finished all before it was killed"
            )
            services.start("worker-2", "worker", env=env)
            await services.wait(lambda: all_finished(service, rows), timeout=120, message="all rows finished")
    finally:
        services.kill_all()
    assert await count_status(service, "failed") == 0
