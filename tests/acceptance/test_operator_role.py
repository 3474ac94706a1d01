"""Every command the README gives an operator works as a user holding only `outbox_relay_operator`
(issue 15, item 3), on a replicated deployment made as a user makes it: the CLI's `migrate --primary`,
`migrate`, `subscribe`, then `run` and `worker` as their own roles."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.acceptance.conftest import as_user, made_by_the_cli
from tests.acceptance.test_cli import cli, describe
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env, count_status, open_account, produce, reserve
from tests.servers import PgServer, RedisServer


@pytest.fixture
async def outbox_env(pg_server: PgServer, redis_server: RedisServer) -> AsyncIterator[OutboxEnv]:
    """Two empty databases made replicated by the CLI alone: migrate --primary, migrate, subscribe."""
    commands = (("migrate", "--primary"), ("migrate",), ("subscribe",))
    async with made_by_the_cli(pg_server, redis_server, *commands) as env:
        yield env


def _doctor_denials(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report["checks"] if "permission denied" in json.dumps(c).lower()]


async def test_operator_runs_every_operator_command(
    outbox_env: OutboxEnv, users: dict[str, str], services: Services
) -> None:
    """doctor (text, --json), status, status --watch, requeue and prune (both sides) work as the operator."""

    def env_for(duty: str, **extra: str) -> dict[str, str]:
        urls = {
            "DATABASE_URL": as_user(outbox_env.service_url, users[duty]),
            "PRIMARY_URL": as_user(outbox_env.primary_url, users[duty]),
        }
        return cli_env(outbox_env.env(**urls, **extra))

    await services.start_fleet(env_for("relay"), relays=("relay",), workers=())
    await services.ready(services.start_worker("worker", env_for("worker")), role="worker")
    primary = await asyncpg.connect(outbox_env.primary_url)
    service = await asyncpg.connect(outbox_env.service_url)
    try:
        await open_account(service, "acc", 100)
        await reserve(service, "acc", 40, "op-1")
        await produce(primary, "op-1", "success")
        await produce(primary, "op-poison", "success", kind="no-such-kind")

        async def settled() -> bool:
            return await count_status(service, "finished", "failed") == 2

        await services.wait(settled, timeout=30, message="both rows finished or failed")
    finally:
        await primary.close()
        await service.close()

    operator = env_for("operator")
    text = await cli("doctor", env=operator)
    assert "permission denied" not in (text.stdout + text.stderr).lower(), describe(text)
    assert text.returncode == 0, describe(text)
    report = await cli("doctor", "--json", env=operator)
    assert report.returncode == 0, describe(report)
    assert _doctor_denials(json.loads(report.stdout)) == [], describe(report)
    names = {c["name"] for c in json.loads(report.stdout)["checks"]}
    assert {"subscription", "apply worker", "subscription streaming", "primary slot", "relay"} <= names

    status = await cli("status", "--json", env=operator)
    assert status.returncode == 0, describe(status)
    assert json.loads(status.stdout)["counts"]["failed"] == 1
    await _watch_twice(services, operator)

    for command in (
        ("requeue", "--all-failed"),
        ("prune", "--older-than", "0.001"),
        ("prune", "--primary", "--older-than", "0.001", "--wait", "20"),
    ):
        result = await cli(*command, env=operator)
        assert result.returncode == 0, f"{' '.join(command)}: {describe(result)}"
        assert "permission denied" not in result.stderr.lower(), describe(result)


async def _watch_twice(services: Services, env: dict[str, str]) -> None:
    """`status --watch` piped: two refreshes with the replication figures, then Ctrl-C ends it, exit 0."""
    watch = services.start("watch", "status", "--watch", "--interval", "0.2", env=env)
    await services.wait_logged(watch, "lag=", count=2, timeout=30)
    assert "connection lost" not in watch.text(), watch.text()
    assert "permission denied" not in watch.text(), watch.text()
    watch.proc.send_signal(signal.SIGINT)
    assert await services.wait_exit(watch, timeout=15) == 0, watch.text()
