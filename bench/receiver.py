"""``python -m bench.receiver --port P --delay-ms N``: the webhook route's receiver, a process of its own.

Every POST is counted and answered 204 after ``N`` ms (0: at once); ``GET /stats``
says how many requests came and how many distinct ``webhook-id`` values they
carried. It prints its base URL on one line once it listens (``--port 0``: a free
port) and runs until terminated. Signatures are not checked: the sink's cost is
what the bench measures, not the receiver's.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Sequence

from aiohttp import web

from outbox_relay.lifecycle import run_async, stop_on_signals


class Counter:
    """Requests received, and their distinct delivery ids."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.requests = 0
        self.ids: set[str] = set()

    async def hook(self, request: web.Request) -> web.Response:
        """Take one delivery: read it, count it, answer after the delay."""
        await request.read()
        self.requests += 1
        self.ids.add(request.headers.get("webhook-id", ""))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=204)

    async def stats(self, _: web.Request) -> web.Response:
        """What came so far."""
        return web.json_response({"requests": self.requests, "distinct": len(self.ids)})


async def serve(port: int, delay_ms: int) -> int:
    """Listen on 127.0.0.1:``port``, say where, and serve until SIGTERM or SIGINT."""
    counter = Counter(delay_ms / 1000)
    app = web.Application()
    app.router.add_post("/{tail:.*}", counter.hook)
    app.router.add_get("/stats", counter.stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    await web.SockSite(runner, sock, backlog=1024).start()
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    try:
        await stop_on_signals().wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.receiver", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--delay-ms", type=int, default=0, help="answer after this many ms (0)")
    args = parser.parse_args(argv)
    return run_async(serve(args.port, args.delay_ms))


if __name__ == "__main__":
    sys.exit(main())
