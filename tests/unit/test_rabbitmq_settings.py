"""The `rabbitmq` sink's settings: OUTBOX_RELAY_RABBITMQ_*, bounded, the URL a secret."""

from __future__ import annotations

import os

import pytest

from outbox_relay.config import load
from outbox_relay.exceptions import PermanentError, SettingsError
from outbox_relay.sinks.rabbitmq import RabbitmqConfig, RabbitmqSettings, routing_key_for
from tests.helpers import cli_env, run_cli


@pytest.fixture(autouse=True)
def _no_outbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OUTBOX_RELAY_* variable of the caller leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("OUTBOX_RELAY_"):
            monkeypatch.delenv(name)


def test_the_defaults_reach_the_local_broker_and_the_outbox_exchange() -> None:
    """Unset, the sink publishes to exchange `outbox` of amqp://guest:guest@127.0.0.1:5672/, and the
    URL (a secret) shows in no repr."""
    settings = load(RabbitmqSettings)
    assert settings.url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert (settings.exchange, settings.timeout, settings.connect_timeout) == ("outbox", 5.0, 2.0)
    config = RabbitmqConfig.from_settings(settings)
    assert "guest:guest" not in repr(settings)
    assert "guest:guest" not in repr(config)
    assert config.address == "127.0.0.1:5672"


def test_values_within_bounds_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """An amqps URL with a vhost, an exchange with dots and non-ASCII letters, timeouts at their bounds."""
    monkeypatch.setenv("OUTBOX_RELAY_RABBITMQ_URL", "amqps://app:s3cret@mq.example:5671/prod%2Feu")
    monkeypatch.setenv("OUTBOX_RELAY_RABBITMQ_EXCHANGE", "orders.événements")
    monkeypatch.setenv("OUTBOX_RELAY_RABBITMQ_TIMEOUT", "3600")
    monkeypatch.setenv("OUTBOX_RELAY_RABBITMQ_CONNECT_TIMEOUT", "60")
    config = RabbitmqConfig.from_settings(load(RabbitmqSettings))
    assert (config.exchange, config.timeout, config.connect_timeout) == ("orders.événements", 3600.0, 60.0)
    assert config.address == "mq.example:5671 (vhost 'prod/eu')"
    assert config.scrub("failed: amqps://app:s3cret@mq.example") == "failed: amqps://app:***@mq.example"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_RELAY_RABBITMQ_URL", "http://127.0.0.1:5672/"),
        ("OUTBOX_RELAY_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:99999/"),
        ("OUTBOX_RELAY_RABBITMQ_EXCHANGE", ""),
        ("OUTBOX_RELAY_RABBITMQ_EXCHANGE", "out\nbox"),
        ("OUTBOX_RELAY_RABBITMQ_EXCHANGE", "x" * 256),
        ("OUTBOX_RELAY_RABBITMQ_EXCHANGE", "é" * 200),
        ("OUTBOX_RELAY_RABBITMQ_TIMEOUT", "0"),
        ("OUTBOX_RELAY_RABBITMQ_TIMEOUT", "nan"),
        ("OUTBOX_RELAY_RABBITMQ_TIMEOUT", "3601"),
        ("OUTBOX_RELAY_RABBITMQ_CONNECT_TIMEOUT", "-1"),
        ("OUTBOX_RELAY_RABBITMQ_CONNECT_TIMEOUT", "61"),
    ],
)
def test_a_bad_value_is_a_settings_error_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Each bound is checked at the edge."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load(RabbitmqSettings)
    assert caught.value.variable == variable


def test_a_routing_key_over_255_bytes_is_permanent_naming_the_kind() -> None:
    """AMQP's routing key is a short string: 255 bytes, not characters."""
    assert routing_key_for("é" * 127) == "é" * 127
    with pytest.raises(PermanentError, match=r"'éééé.*256 bytes: too long for a RabbitMQ routing key"):
        routing_key_for("é" * 128)


def test_the_worker_exits_2_naming_a_bad_rabbitmq_setting_without_the_password() -> None:
    """`outbox-relay worker` with OUTBOX_RELAY_RABBITMQ_TIMEOUT out of bounds: exit 2, one line naming
    it, before connecting to anything; the URL's password nowhere."""
    env = cli_env(
        {
            "OUTBOX_RELAY_DATABASE_URL": "postgresql://svc@192.0.2.1:5432/svc",
            "OUTBOX_RELAY_ROUTES": "ev.*=rabbitmq",
            "OUTBOX_RELAY_RABBITMQ_URL": "amqp://app:t0ps3cret@192.0.2.1:5672/",
            "OUTBOX_RELAY_RABBITMQ_TIMEOUT": "86400",
        }
    )
    result = run_cli("worker", env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "OUTBOX_RELAY_RABBITMQ_TIMEOUT" in lines[0]
    assert "t0ps3cret" not in result.stderr
