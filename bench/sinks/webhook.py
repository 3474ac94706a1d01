"""The ``webhook`` route: a local receiver (:mod:`bench.receiver`) in a process of its own, answering
at once or after a delay."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from bench.fleet import ROOT
from bench.sinks import Destination, SinkRoute, Unavailable

#: A Standard Webhooks signing secret of the bench's own.
SECRET = "whsec_" + base64.b64encode(b"outbox-relay-bench-secret").decode()
#: Seconds the receiver has to say where it listens.
START_TIMEOUT = 30.0


@asynccontextmanager
async def receiver(delay_ms: int) -> AsyncIterator[str]:
    """A receiver process answering after ``delay_ms``; its base URL (it stops on exit)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.receiver",
        "--port",
        "0",
        "--delay-ms",
        str(delay_ms),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        if not line.startswith(b"http://"):
            raise Unavailable(f"the webhook receiver did not start (it said {line[:200]!r})")
        yield line.decode().strip()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _received(base: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{base}/stats") as response:
        return int(json.loads(await response.read())["requests"])


def route(delay_ms: int = 0) -> SinkRoute:
    """POSTs signed per Standard Webhooks to a receiver that answers 204 after ``delay_ms``."""

    @asynccontextmanager
    async def _open(workdir: Path, tag: str) -> AsyncIterator[Destination]:
        try:
            import aiohttp  # noqa: F401
        except ImportError as exc:  # the `webhook` extra not installed
            raise Unavailable(str(exc)) from None
        async with receiver(delay_ms) as base:

            async def count() -> int:
                return await _received(base)

            env = {"OUTBOX_RELAY_WEBHOOK_URL": f"{base}/hook", "OUTBOX_RELAY_WEBHOOK_SECRET": SECRET}
            yield Destination(env, count, urlsplit(base).port)

    name = "webhook" if not delay_ms else f"webhook_{delay_ms}ms"
    answer = "at once" if not delay_ms else f"after {delay_ms} ms"
    return SinkRoute(name, "webhook", f"webhook (local receiver process answering {answer})", _open)
