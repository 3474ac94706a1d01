"""Fixtures of the acceptance tests: login users holding only the shipped roles."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import outbox_relay
from outbox_relay.db import quote_ident
from tests.acceptance.test_cli import cli, describe
from tests.conftest import OutboxEnv, create_outbox_env, drop_outbox_env
from tests.helpers import cli_env
from tests.servers import PgServer, RedisServer

ROLES_DIR = Path(outbox_relay.__file__).resolve().parent


def _password(user: str) -> str:
    """Each test user's password (a server in a container asks for one, an embedded one trusts)."""
    return f"pw-{user}"


def as_user(url: str, user: str) -> str:
    """``url`` logging in as ``user`` (the test users' password)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{_password(user)}@{host}"))


@contextlib.asynccontextmanager
async def made_by_the_cli(
    pg_server: PgServer, redis_server: RedisServer, *commands: tuple[str, ...]
) -> AsyncIterator[OutboxEnv]:
    """Two empty databases on which the CLI ran ``commands`` in turn (each exiting 0), as a user
    makes a deployment; both dropped after the block."""
    env = await create_outbox_env(pg_server, redis_server.url(), migrate_primary=False, migrate_service=False)
    try:
        for command in commands:
            result = await cli(*command, env=cli_env(env.env()))
            assert result.returncode == 0, describe(result)
        yield env
    finally:
        await drop_outbox_env(env)


async def apply_roles(outbox_env: OutboxEnv) -> None:
    """Apply roles_service.sql and roles_primary.sql as the README says, twice (safe to run again)."""
    sides = ((outbox_env.service_url, "roles_service.sql"), (outbox_env.primary_url, "roles_primary.sql"))
    for url, name in sides:
        conn = await asyncpg.connect(url)
        try:
            sql = (ROLES_DIR / name).read_text()
            await conn.execute(sql)
            await conn.execute(sql)
        finally:
            await conn.close()


@pytest.fixture
async def users(outbox_env: OutboxEnv) -> AsyncIterator[dict[str, str]]:
    """Apply the roles; one login user per role (duty -> user name)."""
    await apply_roles(outbox_env)
    tag = uuid.uuid4().hex[:8]
    made = {duty: f"{duty}_{tag}" for duty in ("relay", "worker", "operator", "producer", "subscriber")}
    admin = await asyncpg.connect(outbox_env.pg.url("postgres"))
    try:
        for duty, user in made.items():
            await admin.execute(
                f"CREATE ROLE {quote_ident(user)} LOGIN PASSWORD '{_password(user)}'"
                f" IN ROLE outbox_relay_{duty}"
            )
        yield made
    finally:
        for user in made.values():
            await admin.execute(f"DROP ROLE IF EXISTS {quote_ident(user)}")
        await admin.close()
