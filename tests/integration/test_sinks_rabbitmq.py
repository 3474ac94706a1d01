"""The `rabbitmq` sink against a real RabbitMQ (see tests/servers.py: the given one, the machine's, or a
container); every test on an exchange and queues of its own, deleted after."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import TransientError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.settings import Settings
from outbox_relay.sinks.rabbitmq import RabbitmqConfig, RabbitmqSink
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env, count_status, equals, running_relay, running_worker, wait_until
from tests.integration.rabbitmq_support import (
    Topology,
    declare,
    delete,
    depth,
    drain,
    forwarding,
    message_ids,
    silent,
    topology,
    unique,
)
from tests.integration.sinks_support import (
    all_finished,
    insert_events,
    migrate_sinks,
    routed_registry,
    worker_killed_mid_stream,
)
from tests.servers import session_rabbitmq

#: A kind of 136 characters but 269 bytes: over AMQP's 255-byte routing key.
LONG_KIND = "ev." + "é" * 133
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def rabbit() -> Iterator[str]:
    """The broker's URL; the module skips with one line when none answers."""
    server = session_rabbitmq()
    if isinstance(server, str):
        pytest.skip(server)
    yield server.url
    server.cleanup()


@pytest.fixture
async def bound(rabbit: str) -> AsyncIterator[Topology]:
    """An exchange of this test's own with a durable queue bound for ``ev.#``."""
    async with topology(rabbit) as made:
        yield made


def rabbit_settings(
    env: OutboxEnv, url: str, exchange: str, **overrides: Any
) -> tuple[Settings, HandlerRegistry]:
    """Settings routing ev.* to the rabbitmq sink, and the registry the edge builds."""
    settings = env.settings(**{"routes": "ev.*=rabbitmq", **overrides})
    rabbitmq = {"url": url, "exchange": exchange, "timeout": 2.0}
    return settings, routed_registry(settings, rabbitmq=rabbitmq)


def worker_env(env: OutboxEnv, url: str, exchange: str, **extra: str) -> dict[str, str]:
    """The environment of a `worker` routing ev.* to the rabbitmq sink."""
    return cli_env(env.env(ROUTES="ev.*=rabbitmq", RABBITMQ_URL=url, RABBITMQ_EXCHANGE=exchange, **extra))


async def test_n_rows_make_n_confirmed_persistent_messages(
    outbox_env: OutboxEnv, service: Any, rabbit: str, bound: Topology
) -> None:
    """200 routed rows finish, and the bound durable queue holds exactly 200 persistent messages: the
    event JSON, routing key = kind, message_id = the delivery id."""
    settings, registry = rabbit_settings(outbox_env, rabbit, bound.exchange)
    await migrate_sinks(outbox_env.service_url, registry)
    cids = await insert_events(service, "n", 200)
    async with running_worker(settings, registry), running_relay(settings):
        await wait_until(lambda: all_finished(service, 200), timeout=60, message="200 rows finished")
    messages = await drain(rabbit, bound.queue)
    assert sorted(message_ids(messages)) == sorted(cids)
    first = messages[0]
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.routing_key == "ev.created"
    assert first.exchange == bound.exchange
    assert first.content_type == "application/json"
    assert first.type == "ev.created"
    event = json.loads(first.body)
    assert set(event) == {"correlation_id", "kind", "outcome", "payload", "created_at"}
    assert event["correlation_id"] == first.message_id
    assert first.headers == {"kind": "ev.created", "outcome": "success", "correlation_id": first.message_id}
    assert datetime.fromisoformat(event["created_at"]).utcoffset() is not None


async def test_an_unroutable_kind_fails_permanently_naming_exchange_and_key(
    outbox_env: OutboxEnv, service: Any, rabbit: str, bound: Topology
) -> None:
    """A kind no queue is bound for fails at its first attempt, last_error naming exchange and routing
    key, as does a kind over 255 bytes; the other rows, in flight on the same channel, are delivered."""
    settings, registry = rabbit_settings(
        outbox_env, rabbit, bound.exchange, routes="ev.*=rabbitmq,other.*=rabbitmq"
    )
    await migrate_sinks(outbox_env.service_url, registry)
    await insert_events(service, "lost", 5, kind="other.thing")
    await insert_events(service, "long", 2, kind=LONG_KIND)
    await insert_events(service, "flow", 50)
    async with running_worker(settings, registry), running_relay(settings):
        await wait_until(lambda: all_finished(service, 50), timeout=60, message="50 ev rows finished")
        await wait_until(
            lambda: equals(count_status(service, "failed"), 7), timeout=30, message="7 rows failed"
        )
    failed = await service.fetch(
        "SELECT kind, attempts, last_error FROM outbox_relay.outbox WHERE status = 'failed'"
    )
    for row in (r for r in failed if r["kind"] == LONG_KIND):
        assert row["attempts"] == 1
        assert "269 bytes: too long for a RabbitMQ routing key" in row["last_error"]
    failed = [r for r in failed if r["kind"] != LONG_KIND]
    assert len(failed) == 5
    for row in failed:
        assert row["attempts"] == 1
        assert bound.exchange in row["last_error"]
        assert "'other.thing'" in row["last_error"]
        assert "NO_ROUTE" in row["last_error"]
    assert await depth(rabbit, bound.queue) == 50


async def test_a_missing_exchange_fails_permanently_and_the_channel_recovers(
    outbox_env: OutboxEnv, service: Any, rabbit: str
) -> None:
    """Rows published to an exchange that does not exist fail permanently naming it (the broker closes
    the channel); once the exchange is declared, the same worker delivers the next rows on a new one."""
    made = Topology(unique("x"), unique("q"))
    settings, registry = rabbit_settings(outbox_env, rabbit, made.exchange)
    await migrate_sinks(outbox_env.service_url, registry)
    try:
        await insert_events(service, "nox", 10)
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(
                lambda: equals(count_status(service, "failed"), 10), timeout=30, message="10 rows failed"
            )
            errors = {
                r["last_error"] for r in await service.fetch("SELECT last_error FROM outbox_relay.outbox")
            }
            assert errors == {f"RabbitMQ has no exchange {made.exchange!r} (routing key 'ev.created')"}
            await declare(rabbit, made.exchange, ["ev.#"], made.queue)
            await insert_events(service, "after", 20)
            await wait_until(lambda: all_finished(service, 20), timeout=30, message="20 later rows finished")
        assert await depth(rabbit, made.queue) == 20
    finally:
        await delete(rabbit, made)


async def test_a_broker_away_is_transient_and_rows_finish_when_it_returns(
    outbox_env: OutboxEnv, service: Any, rabbit: str, bound: Topology
) -> None:
    """The broker cut off (the forwarder in front of it closed, its connections dropped): attempts fail
    transiently naming RabbitMQ, nothing fails; reopened, every row finishes, each message once."""
    async with forwarding(rabbit) as forwarder:
        settings, registry = rabbit_settings(
            outbox_env,
            forwarder.url(),
            bound.exchange,
            max_attempts=100,
            retry_backoff=0.2,
            retry_backoff_max=1.0,
        )
        await migrate_sinks(outbox_env.service_url, registry)
        await insert_events(service, "before", 30)
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(lambda: all_finished(service, 30), timeout=60, message="first 30 finished")
            await forwarder.close()
            await insert_events(service, "during", 30)
            await wait_until(
                lambda: service.fetchval(
                    "SELECT count(*) >= 10 FROM outbox_relay.outbox"
                    " WHERE status = 'queued' AND attempts >= 2 AND last_error LIKE 'RabbitMQ%'"
                ),
                timeout=30,
                message="attempts failing transiently while the broker is away",
            )
            assert await count_status(service, "failed") == 0
            await forwarder.open()
            await wait_until(lambda: all_finished(service, 60), timeout=60, message="all 60 finished")
    ids = message_ids(await drain(rabbit, bound.queue))
    assert len(ids) == len(set(ids)) == 60


async def test_the_password_never_reaches_a_log_or_last_error(
    outbox_env: OutboxEnv, service: Any, rabbit: str, bound: Topology, tmp_path: Any
) -> None:
    """A worker (the CLI, DEBUG logs) given a URL whose password the broker refuses: its attempts fail
    transiently, and neither its log nor last_error nor doctor's check holds the password."""
    password = "Pw-n0t-f0r-l0gs"
    wrong = with_password(rabbit, password)
    settings, registry = rabbit_settings(outbox_env, wrong, bound.exchange)
    await migrate_sinks(outbox_env.service_url, registry)
    await insert_events(service, "pw", 5)
    env = worker_env(outbox_env, wrong, bound.exchange, LOG_LEVEL="DEBUG", MAX_ATTEMPTS="100")
    services = Services(tmp_path)
    try:
        async with running_relay(settings):
            worker = services.start("worker", "worker", env=env)
            await services.wait(
                lambda: service.fetchval(
                    "SELECT count(*) = 5 FROM outbox_relay.outbox WHERE last_error LIKE 'RabbitMQ%'"
                ),
                timeout=60,
                message="5 rows with a RabbitMQ error",
            )
    finally:
        services.kill_all()
    errors = [r["last_error"] for r in await service.fetch("SELECT last_error FROM outbox_relay.outbox")]
    assert await count_status(service, "failed") == 0
    assert all(password not in e for e in errors), errors
    assert all("refused the login" in e for e in errors), errors
    assert password not in worker.text()
    sink = RabbitmqSink(RabbitmqConfig(url=wrong, exchange=bound.exchange, timeout=2.0, connect_timeout=2.0))
    checks = await sink.diagnose(["ev.created"])
    assert [c.status for c in checks] == ["fail"]
    assert password not in repr(checks)


def with_password(url: str, password: str) -> str:
    """``url`` with its password replaced by ``password``."""
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:{password}@{host}"


async def test_diagnose_reports_the_server_and_the_exchange(rabbit: str, bound: Topology) -> None:
    """diagnose: the server's version and the exchange (bound queues not checked); a missing exchange,
    an unreachable broker and a kind too long for a routing key each fail with what to do."""
    config = RabbitmqConfig(url=rabbit, exchange=bound.exchange, timeout=2.0, connect_timeout=2.0)
    checks = await RabbitmqSink(config).diagnose(["ev.created"])
    assert [(c.name, c.status) for c in checks] == [("rabbitmq", "ok"), ("rabbitmq exchange", "ok")]
    assert "RabbitMQ 3." in checks[0].detail or "RabbitMQ 4." in checks[0].detail
    assert "bound queues not checked over AMQP" in checks[1].detail
    missing = RabbitmqConfig(url=rabbit, exchange=unique("none"), timeout=2.0, connect_timeout=2.0)
    checks = await RabbitmqSink(missing).diagnose(["x" * 300])
    assert [(c.name, c.status) for c in checks] == [
        ("rabbitmq", "ok"),
        ("rabbitmq exchange", "fail"),
        ("rabbitmq routing keys", "fail"),
    ]
    assert missing.exchange in checks[1].detail
    assert checks[1].fix is not None
    assert "rabbitmqadmin declare exchange" in checks[1].fix
    async with forwarding(rabbit) as forwarder:
        away = forwarder.url()
        await forwarder.close()
        checks = await RabbitmqSink(
            RabbitmqConfig(url=away, exchange=bound.exchange, timeout=2.0, connect_timeout=2.0)
        ).diagnose([])
    assert [(c.name, c.status) for c in checks] == [("rabbitmq", "fail")]
    assert "unreachable" in checks[0].detail
    assert checks[0].fix is not None
    assert "OUTBOX_RELAY_RABBITMQ_URL" in checks[0].fix


async def test_deliveries_queued_behind_a_hung_connect_fail_together(bound: Topology) -> None:
    """A broker that takes the TCP connection and never answers: 32 deliveries at once all fail
    transiently within about one connect timeout, not one timeout after another."""
    async with silent() as url:
        sink = RabbitmqSink(
            RabbitmqConfig(url=url, exchange=bound.exchange, timeout=2.0, connect_timeout=1.0)
        )
        event = OutboxEvent(
            id=1, correlation_id="hung", kind="ev.created", outcome="success", payload={}, created_at=NOW
        )
        started = time.monotonic()
        async with sink.lifespan():
            results = await asyncio.gather(
                *(sink.deliver(event, b"{}", f"hung-{i}") for i in range(32)), return_exceptions=True
            )
        elapsed = time.monotonic() - started
    assert all(isinstance(r, TransientError) for r in results), results
    assert all("unreachable" in str(r) for r in results), results
    assert elapsed < 3.0, f"32 deliveries took {elapsed:.1f} s against a 1 s connect timeout"


@pytest.mark.slow
async def test_a_worker_sigkilled_mid_stream_delivers_every_row_under_its_id(
    outbox_env: OutboxEnv, service: Any, rabbit: str, bound: Topology, tmp_path: Any
) -> None:
    """A `worker` process SIGKILLed while publishing: its jobs run again in another worker, every row
    finishes, and the queue holds every row; a duplicate only ever under the same message_id."""
    _, registry = rabbit_settings(outbox_env, rabbit, bound.exchange)
    await migrate_sinks(outbox_env.service_url, registry)
    n = 400
    cids = await insert_events(service, "kill", n)
    sink_env = {"ROUTES": "ev.*=rabbitmq", "RABBITMQ_URL": rabbit, "RABBITMQ_EXCHANGE": bound.exchange}
    await worker_killed_mid_stream(
        outbox_env,
        service,
        sink_env,
        tmp_path,
        rows=n,
        started=lambda: _at_least(rabbit, bound.queue, 50),
        what="50 messages published",
    )
    ids = message_ids(await drain(rabbit, bound.queue))
    assert set(ids) == set(cids)
    assert len(ids) >= n


async def _at_least(url: str, queue: str, n: int) -> bool:
    return await depth(url, queue) >= n
