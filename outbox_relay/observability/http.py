"""The HTTP endpoints of ``run`` and ``worker``: ``/healthz``, ``/readyz``, ``/metrics`` (aiohttp).

Start and stop it as an async context manager::

    async with ObservabilityServer(health, metrics, host="0.0.0.0", port=8080):
        ...  # serve

Every answer is computed from memory: a probe or a scrape never touches the
database or Redis (the relay refreshes its database gauges on an interval).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web

from outbox_relay.exceptions import UnavailableError
from outbox_relay.observability.health import Health
from outbox_relay.observability.metrics import CONTENT_TYPE_LATEST, Metrics, Role

logger = logging.getLogger(__name__)


def build_app(health: Health, metrics: Metrics | None) -> web.Application:
    """The aiohttp application serving the three endpoints."""

    async def healthz(_request: web.Request) -> web.Response:
        live = health.liveness()
        return web.json_response(live.as_json(), status=200 if live.ok else 503)

    async def readyz(_request: web.Request) -> web.Response:
        ready = health.readiness()
        return web.json_response(ready.as_json(), status=200 if ready.ready else 503)

    async def metrics_page(_request: web.Request) -> web.Response:
        body = metrics.exposition() if metrics is not None else b""
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


class ObservabilityServer:
    """aiohttp's AppRunner + TCPSite on ``host:port`` (port 0: any free port, see :attr:`port`)."""

    def __init__(self, health: Health, metrics: Metrics | None, *, host: str, port: int) -> None:
        self.health = health
        self.metrics = metrics
        self.host = host
        self.requested_port = port
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the observability server is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        runner = web.AppRunner(
            build_app(self.health, self.metrics), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        logger.info("serving /healthz, /readyz and /metrics", extra={"host": self.host, "port": self.port})

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> ObservabilityServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@dataclass(frozen=True)
class HttpConfig:
    """Where the endpoints are served, and the variable to name when the port cannot be bound."""

    host: str
    port: int
    variable: str = "HTTP_PORT"


@contextlib.asynccontextmanager
async def serving(
    config: HttpConfig | None, role: Role
) -> AsyncIterator[tuple[Health | None, Metrics | None]]:
    """``(health, metrics)`` served on ``config``'s address while inside, the metrics those of
    ``role``; ``(None, None)`` and no server without a config (``HTTP_PORT`` not set)."""
    if config is None:
        yield None, None
        return
    health, metrics = Health(), Metrics(role)
    server = ObservabilityServer(health, metrics, host=config.host, port=config.port)
    try:
        await server.start()
    except OSError as exc:
        raise UnavailableError(
            f"cannot serve HTTP on {config.host}:{config.port} ({config.variable}): {exc.strerror or exc}"
        ) from None
    try:
        yield health, metrics
    finally:
        await server.stop()
