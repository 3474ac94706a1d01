"""The webhook sink against hostile or careless endpoints: huge answers, redirects."""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web

from tests.conftest import OutboxEnv
from tests.helpers import count_status, equals, running_relay, running_worker, wait_until
from tests.integration.sinks_support import SECRET, insert_events, routed_registry, serving


async def test_a_huge_answer_is_not_read_whole(outbox_env: OutboxEnv, service: Any) -> None:
    """An endpoint answering 200 with a 400 MB body: the row finishes, and the sink stopped reading
    after a small bound (the endpoint could write only a few MB before the connection closed)."""
    written: list[int] = []

    async def flood(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Length": str(400 * 2**20)})
        await response.prepare(request)
        sent, chunk = 0, b"x" * 2**20
        with contextlib.suppress(ConnectionError, RuntimeError):
            while sent < 400 * 2**20:
                await response.write(chunk)
                sent += len(chunk)
        written.append(sent)
        return response

    async with serving(flood) as url:
        settings = outbox_env.settings(routes="ev.*=webhook")
        registry = routed_registry(settings, webhook={"url": url, "secret": SECRET, "timeout": 5.0})
        await insert_events(service, "flood", 1)
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(lambda: equals(count_status(service, "finished"), 1), timeout=30, message="done")
            await wait_until(lambda: bool(written), timeout=10, message="the endpoint stopped writing")
    assert written[0] < 64 * 2**20, f"the sink read {written[0] / 2**20:.0f} MB of the answer"


async def test_a_redirect_is_permanent_and_names_its_location(outbox_env: OutboxEnv, service: Any) -> None:
    """A 302 is not followed: the row fails at once, last_error naming the Location."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    async with serving(redirect) as url:
        settings = outbox_env.settings(routes="ev.*=webhook")
        registry = routed_registry(settings, webhook={"url": url, "secret": SECRET, "timeout": 5.0})
        await insert_events(service, "redir", 1)
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(lambda: equals(count_status(service, "failed"), 1), timeout=30, message="failed")
    row = await service.fetchrow("SELECT attempts, last_error FROM outbox_relay.outbox")
    assert row["attempts"] == 1
    assert "302" in row["last_error"]
    assert "http://169.254.169.254/latest/meta-data/" in row["last_error"]
