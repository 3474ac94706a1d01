"""Fixtures: real servers for the session, fresh databases for each test."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from outbox_relay.composition import replication_config
from outbox_relay.db import quote_ident
from outbox_relay.handlers import load_plugins, registry
from outbox_relay.migrate import migrate
from outbox_relay.replication import unsubscribe
from outbox_relay.settings import Settings
from tests.helpers import Services
from tests.servers import PgServer, RedisServer, session_postgres, session_redis

# What the CLI does at its edge: the installed plugins (the reservation domain) register.
load_plugins(registry)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OUTBOX_RELAY_* variable of the developer's shell leaks into the test."""
    for name in list(os.environ):
        if name.upper().startswith("OUTBOX_RELAY_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The PostgreSQL server (wal_level = logical) most tests share."""
    server = session_postgres()
    yield server
    server.cleanup()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """The CLI subprocesses of one test, all killed at its end (SIGKILL ends a stopped one too)."""
    started = Services(tmp_path)
    yield started
    started.kill_all()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The Redis server most tests share."""
    server = session_redis()
    yield server
    server.cleanup()


@dataclass
class OutboxEnv:
    """A fresh primary and service database pair on one server, plus the settings to use them."""

    pg: PgServer
    redis_url: str
    service_db: str
    primary_db: str
    queue_name: str
    subscription_name: str
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def service_url(self) -> str:
        return self.pg.url(self.service_db)

    @property
    def primary_url(self) -> str:
        return self.pg.url(self.primary_db)

    def settings(self, **overrides: Any) -> Settings:
        """Settings for this environment (fast test defaults; ``overrides`` win)."""
        values: dict[str, Any] = {
            "database_url": self.service_url,
            "primary_url": self.primary_url,
            "redis_url": self.redis_url,
            "queue_name": self.queue_name,
            "subscription_name": self.subscription_name,
            **self.defaults,
            **overrides,
        }
        return Settings(**values)

    def env(self, **overrides: str) -> dict[str, str]:
        """The same settings as OUTBOX_RELAY_* environment variables (for the CLI)."""
        values = {
            "DATABASE_URL": self.service_url,
            "PRIMARY_URL": self.primary_url,
            "REDIS_URL": self.redis_url,
            "QUEUE_NAME": self.queue_name,
            "SUBSCRIPTION_NAME": self.subscription_name,
            **{k.upper(): str(v) for k, v in self.defaults.items()},
            **{k.upper(): v for k, v in overrides.items()},
        }
        return {f"OUTBOX_RELAY_{k}": v for k, v in values.items()}


async def create_outbox_env(
    pg: PgServer, redis_url: str, *, migrate_primary: bool = True, migrate_service: bool = True
) -> OutboxEnv:
    """Create two fresh databases on ``pg`` and migrate them (each unless told not to)."""
    suffix = uuid.uuid4().hex[:10]
    env = OutboxEnv(
        pg=pg,
        redis_url=redis_url,
        service_db=f"svc_{suffix}",
        primary_db=f"prim_{suffix}",
        queue_name=f"test_{suffix}",
        subscription_name=f"sub_{suffix}",
        defaults={"retry_backoff": 0.05, "retry_backoff_max": 0.2},
    )
    admin = await asyncpg.connect(pg.url("postgres"))
    try:
        for name in (env.service_db, env.primary_db):
            await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
    finally:
        await admin.close()
    for url, target in ((env.service_url, "service"), (env.primary_url, "primary")):
        if not (migrate_primary if target == "primary" else migrate_service):
            continue
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn, target, registry.plugins())  # type: ignore[arg-type]
        finally:
            await conn.close()
    return env


async def drop_outbox_env(env: OutboxEnv) -> None:
    """Drop the subscription and slot (if any) and both databases."""
    with contextlib.suppress(Exception):
        await unsubscribe(replication_config(env.settings()), slot_timeout=10)
    admin = await asyncpg.connect(env.pg.url("postgres"))
    try:
        for name in (env.service_db, env.primary_db):
            with contextlib.suppress(Exception):
                await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def outbox_env(pg_server: PgServer, redis_server: RedisServer) -> AsyncIterator[OutboxEnv]:
    """Fresh, migrated primary and service databases; dropped after the test."""
    env = await create_outbox_env(pg_server, redis_server.url())
    yield env
    await drop_outbox_env(env)


@pytest.fixture
async def service(outbox_env: OutboxEnv) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the service database."""
    conn = await asyncpg.connect(outbox_env.service_url)
    yield conn
    await conn.close()


@pytest.fixture
async def primary(outbox_env: OutboxEnv) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the primary database."""
    conn = await asyncpg.connect(outbox_env.primary_url)
    yield conn
    await conn.close()


#: Set by .ci/run: on CI here every server is at hand, so a test that skips for want of one fails.
NO_SKIP_ENV = "OUTBOX_RELAY_TESTS_NO_SKIP"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With OUTBOX_RELAY_TESTS_NO_SKIP=1, a skipped test is reported failed, its reason kept."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get(NO_SKIP_ENV) == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped where {NO_SKIP_ENV}=1 (CI must run every test): {report.longrepr}"
