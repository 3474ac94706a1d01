"""Least privilege: run, worker and status work as users holding only the shipped roles (issue 7, item 7)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from tests.acceptance.conftest import as_user
from tests.acceptance.test_cli import cli, describe
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env, count_status, open_account, produce, reserve


async def test_run_worker_and_status_as_least_privileged_users(
    outbox_env: OutboxEnv, users: dict[str, str], service: Any, services: Services
) -> None:
    """A row flows new -> finished with relay and worker run as their roles; operator's status sees it."""
    await open_account(service, "acc", 100)
    await reserve(service, "acc", 40, "least-1")
    await reserve(service, "acc", 10, "least-2")

    def env_for(duty: str) -> dict[str, str]:
        return cli_env(outbox_env.env(DATABASE_URL=as_user(outbox_env.service_url, users[duty])))

    relay = services.start_relay("relay", env_for("relay"))
    worker = services.start_worker("worker", env_for("worker"))
    await services.ready(relay, role="active")
    await produce(service, "least-1", "success")
    await produce(service, "least-2", "failure")

    async def both_finished() -> bool:
        return await count_status(service, "finished") == 2

    await services.wait(both_finished, timeout=30, message="rows finished as least-privileged users")
    assert relay.running(), services.tails()
    assert worker.running(), services.tails()
    assert "permission denied" not in relay.text() + worker.text(), services.tails()
    states = dict(await service.fetch("SELECT correlation_id, state FROM ledger.reservations"))
    assert states == {"least-1": "burned", "least-2": "reclaimed"}

    result = await cli("status", "--json", env=env_for("operator"))
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout)["counts"]["finished"] == 2


@pytest.mark.parametrize(
    ("duty", "side", "statement"),
    [
        ("worker", "service", "DROP TABLE outbox_relay.outbox"),
        ("relay", "service", "UPDATE ledger.accounts SET balance = 0"),
        ("operator", "service", "UPDATE ledger.reservations SET state = 'burned'"),
        ("subscriber", "service", "DELETE FROM outbox_relay.outbox"),
        ("producer", "primary", "SELECT * FROM outbox_relay.outbox"),
    ],
)
async def test_each_role_is_refused_what_it_does_not_need(
    outbox_env: OutboxEnv, users: dict[str, str], duty: str, side: str, statement: str
) -> None:
    """A statement outside the role's duty fails with insufficient privilege."""
    url = outbox_env.service_url if side == "service" else outbox_env.primary_url
    conn = await asyncpg.connect(as_user(url, users[duty]))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_producer_role_can_write_the_primary_outbox(
    outbox_env: OutboxEnv, users: dict[str, str]
) -> None:
    """A user holding only outbox_relay_producer inserts an outbox row on the primary."""
    conn = await asyncpg.connect(as_user(outbox_env.primary_url, users["producer"]))
    try:
        await produce(conn, "from-producer")
    finally:
        await conn.close()
