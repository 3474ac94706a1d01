"""Publishing deployed the way the README tells a user: `migrate` with no ROUTES, then a route set on
the workers alone; and a worker whose database is behind its code says "run migrate"."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.acceptance.conftest import made_by_the_cli
from tests.acceptance.test_cli import cli, describe
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env, count_status, equals, http_get
from tests.integration.sinks_support import SECRET, insert_events, receiving
from tests.servers import PgServer, RedisServer


@pytest.fixture
async def outbox_env(pg_server: PgServer, redis_server: RedisServer) -> AsyncIterator[OutboxEnv]:
    """A fresh service database migrated by the CLI's `migrate` with no ROUTES set (the direct shape)."""
    async with made_by_the_cli(pg_server, redis_server, ("migrate",)) as env:
        yield env


def _routed(env: OutboxEnv, url: str) -> dict[str, str]:
    return cli_env(
        env.env(routes="ev.*=webhook"), OUTBOX_RELAY_WEBHOOK_URL=url, OUTBOX_RELAY_WEBHOOK_SECRET=SECRET
    )


async def test_a_route_set_after_migrate_works_on_the_worker_alone(
    outbox_env: OutboxEnv, service: Any, services: Services
) -> None:
    """`migrate` ran before anyone thought of ROUTES; routing ev.* to the webhook is then a setting of
    the worker (and the relay needs nothing): every row reaches the receiver and finishes."""
    async with receiving() as receiver:
        await services.start_fleet(cli_env(outbox_env.env()), workers=())
        worker = services.start_worker("worker", _routed(outbox_env, receiver.url))
        await services.ready(worker, role="worker")
        cids = await insert_events(service, "late-route", 50)
        await services.wait(lambda: equals(count_status(service, "finished"), 50), message="50 finished")
    assert sorted({h["webhook-id"] for _, h, _ in receiver.requests}) == sorted(cids)


async def test_a_worker_behind_the_schema_says_run_migrate_and_starts_once_it_ran(
    outbox_env: OutboxEnv, service: Any, services: Services
) -> None:
    """A database migrated by an older release (no `sinks` set yet): the new worker is not ready, its
    log and /readyz say to run `migrate` (never "cannot reach"); after `migrate` it starts and works."""
    await service.execute("DROP SCHEMA outbox_relay_sinks CASCADE")
    await service.execute("DELETE FROM outbox_relay.schema_migrations WHERE target = 'sinks'")
    async with receiving() as receiver:
        env = _routed(outbox_env, receiver.url)
        worker = services.start_worker("worker", env)
        await services.ready(worker, ready=False)
        await services.wait_logged(worker, "needs `outbox-relay migrate`")
        _, body = await http_get(worker.port or 0, "/readyz")
        assert any("run `migrate`" in reason for reason in body["reasons"]), body
        assert "cannot reach" not in worker.text()
        result = await cli("migrate", env=cli_env(outbox_env.env()))
        assert result.returncode == 0, describe(result)
        await services.ready(worker, role="worker", timeout=30)
        await services.start_fleet(cli_env(outbox_env.env()), workers=())
        await insert_events(service, "after", 5)
        await services.wait(lambda: equals(count_status(service, "finished"), 5), message="5 finished")
