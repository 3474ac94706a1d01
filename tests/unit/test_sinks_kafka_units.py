"""The `kafka` sink without a broker: its settings' bounds, topics, keys, headers, error mapping."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from confluent_kafka import KafkaError

from outbox_relay.config import load
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError, SettingsError, TransientError
from outbox_relay.sinks import SinkContext
from outbox_relay.sinks.kafka import (
    MAX_TOPIC_LENGTH,
    KafkaConfig,
    KafkaSettings,
    KafkaSink,
    _Handle,
    record_headers,
    record_key,
    topic_for,
)
from tests.helpers import cli_env, run_cli

PASSWORD = "k4fka-unit-pw"
EVENT = OutboxEvent(
    id=7,
    correlation_id="job-7",
    kind="ev.created",
    outcome=None,
    payload={},
    created_at=datetime(2026, 1, 2, tzinfo=UTC),
)


@pytest.fixture(autouse=True)
def _no_outbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OUTBOX_RELAY_* variable of the caller leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("OUTBOX_RELAY_"):
            monkeypatch.delenv(name)


def config(**values: object) -> KafkaConfig:
    """The sink's config from settings ``values``, as the edge builds it."""
    context = SinkContext(routes=(), database_url="", concurrency=1, settings=KafkaSettings(**values))  # type: ignore[arg-type]
    return KafkaConfig.from_context(context)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_RELAY_KAFKA_TIMEOUT", "0.5"),
        ("OUTBOX_RELAY_KAFKA_TIMEOUT", "3601"),
        ("OUTBOX_RELAY_KAFKA_TIMEOUT", "nan"),
        ("OUTBOX_RELAY_KAFKA_LINGER_MS", "-1"),
        ("OUTBOX_RELAY_KAFKA_LINGER_MS", "501"),
        ("OUTBOX_RELAY_KAFKA_MESSAGE_MAX_BYTES", "999"),
        ("OUTBOX_RELAY_KAFKA_MESSAGE_MAX_BYTES", "1000000001"),
        ("OUTBOX_RELAY_KAFKA_METADATA_MAX_AGE", "0"),
        ("OUTBOX_RELAY_KAFKA_METADATA_MAX_AGE", "inf"),
        ("OUTBOX_RELAY_KAFKA_TOPIC_PREFIX", "orders events."),
        ("OUTBOX_RELAY_KAFKA_TOPIC_PREFIX", "x" * 201),
        ("OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS", "broker"),
        ("OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS", "broker:0"),
        ("OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS", "a:9092,b:70000"),
        ("OUTBOX_RELAY_KAFKA_COMPRESSION", "brotli"),
        ("OUTBOX_RELAY_KAFKA_SECURITY_PROTOCOL", "SASL"),
        ("OUTBOX_RELAY_KAFKA_SASL_USERNAME", "u" * 257),
        ("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", "p" * 1025),
    ],
)
def test_out_of_bounds_values_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Every setting is bounded on both sides; a bad value is a SettingsError naming its variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load(KafkaSettings)
    assert caught.value.variable == variable


def test_defaults_and_accepted_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults: 127.0.0.1:9092, outbox.event., 5 s; several servers, IPv6 and the bounds themselves pass."""
    defaults = load(KafkaSettings)
    assert (defaults.bootstrap_servers, defaults.topic_prefix) == ("127.0.0.1:9092", "outbox.event.")
    assert defaults.timeout == 5.0  # below JOB_TIMEOUT's default (10 s)
    monkeypatch.setenv("OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS", "k1.example:9092, [::1]:9093,10.0.0.1:1")
    monkeypatch.setenv("OUTBOX_RELAY_KAFKA_TIMEOUT", "3600")
    monkeypatch.setenv("OUTBOX_RELAY_KAFKA_LINGER_MS", "0")
    monkeypatch.setenv("OUTBOX_RELAY_KAFKA_TOPIC_PREFIX", "")
    settings = load(KafkaSettings)
    assert settings.timeout == 3600
    assert settings.topic_prefix == ""


def test_sasl_settings_go_together() -> None:
    """A SASL protocol needs a user and a password; credentials without a SASL protocol are refused."""
    with pytest.raises(SettingsError) as caught:
        config(security_protocol="SASL_SSL", sasl_username="relay")
    assert caught.value.variable == "OUTBOX_RELAY_KAFKA_SASL_PASSWORD"
    with pytest.raises(SettingsError) as caught:
        config(sasl_username="relay", sasl_password=PASSWORD)
    assert caught.value.variable == "OUTBOX_RELAY_KAFKA_SECURITY_PROTOCOL"
    assert PASSWORD not in str(caught.value)
    sasl = config(security_protocol="SASL_SSL", sasl_username="relay", sasl_password=PASSWORD)
    assert sasl.producer_config()["sasl.password"] == PASSWORD
    assert PASSWORD not in repr(sasl)
    assert sasl.redact(f"auth failed for relay:{PASSWORD}") == "auth failed for relay:***"


def test_the_producer_is_idempotent_with_acks_all_and_never_creates_topics() -> None:
    """enable.idempotence, acks=all, the timeout as message.timeout.ms, no topic auto-creation."""
    conf = config(timeout=7.5, linger_ms=20).producer_config()
    assert conf["enable.idempotence"] is True
    assert conf["acks"] == "all"
    assert conf["message.timeout.ms"] == 7500
    assert conf["linger.ms"] == 20
    assert conf["allow.auto.create.topics"] is False
    assert "sasl.password" not in conf


def test_worker_exits_2_naming_a_bad_kafka_setting_without_the_password() -> None:
    """`outbox-relay worker` with OUTBOX_RELAY_KAFKA_TIMEOUT=0: exit 2, one line naming it, before
    connecting anywhere, and the SASL password nowhere."""
    env = cli_env(
        {
            "OUTBOX_RELAY_DATABASE_URL": "postgresql://svc:hunter2@192.0.2.1:5432/svc",
            "OUTBOX_RELAY_ROUTES": "ev.*=kafka",
            "OUTBOX_RELAY_KAFKA_TIMEOUT": "0",
            "OUTBOX_RELAY_KAFKA_SASL_PASSWORD": PASSWORD,
        }
    )
    result = run_cli("worker", env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "OUTBOX_RELAY_KAFKA_TIMEOUT" in lines[0]
    assert PASSWORD not in result.stderr + result.stdout


def test_topic_is_prefix_plus_kind_and_a_kind_that_makes_no_topic_is_permanent() -> None:
    """Topic characters a-z A-Z 0-9 . _ -, at most 249 characters, never "." or ".."."""
    assert topic_for("outbox.event.", "order_created-v2") == "outbox.event.order_created-v2"
    for kind in ("order created", "ev/1", "é", "a*"):
        with pytest.raises(PermanentError, match="does not make a Kafka topic"):
            topic_for("outbox.event.", kind)
    with pytest.raises(PermanentError, match="does not make a Kafka topic"):
        topic_for("", "..")
    topic_for("", "k" * MAX_TOPIC_LENGTH)
    with pytest.raises(PermanentError, match=f"at most {MAX_TOPIC_LENGTH}"):
        topic_for("outbox.event.", "k" * 5000)


def test_key_is_the_correlation_id_and_headers_carry_the_delivery_id() -> None:
    """Key: the correlation id (until rows have an ordering key); headers: id, kind, correlation_id,
    and outcome only when the row has one."""
    assert record_key(EVENT) == b"job-7"
    assert record_headers(EVENT, "job-7#2") == [
        ("id", b"job-7#2"),
        ("kind", b"ev.created"),
        ("correlation_id", b"job-7"),
    ]
    with_outcome = EVENT.model_copy(update={"outcome": "success"})
    assert ("outcome", b"success") in record_headers(with_outcome, "job-7")


@pytest.fixture
def handle() -> Iterator[_Handle]:
    """A producer aimed at nothing (no broker is asked in these tests)."""
    made = _Handle(config(bootstrap_servers="127.0.0.1:1"))
    yield made
    made.close(0)


@pytest.mark.parametrize(
    ("err", "kind", "says"),
    [
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), PermanentError, "MSG_SIZE_TOO_LARGE"),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), PermanentError, "TOPIC_AUTHORIZATION_FAILED"),
        (KafkaError(KafkaError.TOPIC_EXCEPTION), PermanentError, "TOPIC_EXCEPTION"),
        (KafkaError(KafkaError.POLICY_VIOLATION), PermanentError, "POLICY_VIOLATION"),
        (KafkaError(KafkaError._MSG_TIMED_OUT), TransientError, "not acknowledged within"),
        (KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, retriable=True), TransientError, "NOT_ENOUGH_REPLICAS"),
        (KafkaError(KafkaError._TRANSPORT), TransientError, "_TRANSPORT"),
        (KafkaError(KafkaError._PURGE_QUEUE), TransientError, "_PURGE_QUEUE"),
        (KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), TransientError, "checking its metadata"),
    ],
)
def test_delivery_errors_map_to_permanent_or_transient(
    handle: _Handle, err: KafkaError, kind: type[Exception], says: str
) -> None:
    """Errors no retry mends are permanent, naming the topic and the reason; the others transient."""
    sink = KafkaSink(config())
    failure = sink._failure(handle, err, "outbox.event.ev")
    assert type(failure) is kind
    assert says in str(failure)
    assert handle.fatal is None


def test_a_fatal_producer_error_is_transient_and_retires_the_producer(handle: _Handle) -> None:
    """A fatal error (or a broker that lost the producer's id) fails the delivery transiently and
    marks the producer for replacement."""
    sink = KafkaSink(config())
    failure = sink._failure(handle, KafkaError(KafkaError.UNKNOWN_PRODUCER_ID), "t")
    assert isinstance(failure, TransientError)
    assert "new one" in str(failure)
    assert handle.fatal is not None
