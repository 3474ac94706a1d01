"""Plugins own their settings: a prefix of their own, read and checked once at the edge."""

from __future__ import annotations

import os
import sys

import pytest

from outbox_relay.composition import plugins
from outbox_relay.config import load
from outbox_relay.exceptions import SettingsError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.settings import load_settings
from outbox_relay.sinks.nats import NatsSettings
from outbox_relay.sinks.routes import Route
from outbox_relay.sinks.webhook import WebhookSettings
from tests.helpers import cli_env, run_cli
from tests.plugins import echo

DB = "postgresql://svc@127.0.0.1:1/svc"
ECHO = "tests.plugins.echo:plugin"


@pytest.fixture(autouse=True)
def _no_outbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OUTBOX_RELAY_* variable of the caller leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("OUTBOX_RELAY_"):
            monkeypatch.delenv(name)


def test_a_third_party_plugin_reads_its_own_prefix_and_gets_a_narrow_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OUTBOX_RELAY_ECHO_* reach the plugin's sink with the routes naming it, the database URL and
    the worker's concurrency; nothing of the core's settings object."""
    monkeypatch.setenv("OUTBOX_RELAY_ECHO_GREETING", "bonjour")
    monkeypatch.setenv("OUTBOX_RELAY_ECHO_LIMIT", "7")
    settings = load_settings(
        {
            "database_url": DB,
            "handler_modules": ECHO,
            "routes": "ev.*=echo, audit=nats, other.*=echo+nats",
            "worker_concurrency": 5,
        }
    )
    registry = plugins(settings, HandlerRegistry())
    sink = echo.BUILT[-1]
    assert (sink.settings.greeting, sink.settings.limit) == ("bonjour", 7)
    assert sink.context.routes == (Route("ev.*", ("echo",)), Route("other.*", ("echo", "nats")))
    assert sink.context.database_url == DB
    assert sink.context.concurrency == 5
    assert registry.settings_of("echo") is sink.settings
    assert registry.routes() == ["ev.*", "audit", "other.*"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_RELAY_ECHO_LIMIT", "11"),
        ("OUTBOX_RELAY_ECHO_LIMIT", "0"),
        ("OUTBOX_RELAY_ECHO_PAUSE", "inf"),
        ("OUTBOX_RELAY_ECHO_PAUSE", "1e400"),
        ("OUTBOX_RELAY_ECHO_GREETING", "x" * 41),
    ],
)
def test_a_plugins_bad_setting_is_a_settings_error_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """The plugin's bounds are checked at the edge by the same rules as the core's."""
    monkeypatch.setenv(variable, value)
    settings = load_settings({"database_url": DB, "handler_modules": ECHO})
    with pytest.raises(SettingsError) as caught:
        plugins(settings, HandlerRegistry())
    assert caught.value.variable == variable


def test_the_worker_exits_2_with_one_line_naming_a_plugins_bad_setting() -> None:
    """`outbox-relay worker` with a bad OUTBOX_RELAY_ECHO_LIMIT: exit 2, one line, before connecting."""
    env = cli_env(
        {
            "OUTBOX_RELAY_DATABASE_URL": "postgresql://svc:hunter2@192.0.2.1:5432/svc",
            "OUTBOX_RELAY_HANDLER_MODULES": ECHO,
            "OUTBOX_RELAY_ECHO_LIMIT": "99",
            "OUTBOX_RELAY_ECHO_TOKEN": "t0ps3cret",
        },
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    result = run_cli("worker", env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "OUTBOX_RELAY_ECHO_LIMIT" in lines[0]
    assert "hunter2" not in result.stderr
    assert "t0ps3cret" not in result.stderr


def test_core_settings_hold_no_sink_settings() -> None:
    """The sinks' variables are theirs: the core's settings class has no nats_* or webhook_* field."""
    fields = set(type(load_settings()).model_fields)
    assert not {f for f in fields if f.startswith(("nats", "webhook", "kafka"))}
    assert {"url", "subject_prefix", "timeout"} <= set(NatsSettings.model_fields)
    assert {"url", "secret", "timeout"} <= set(WebhookSettings.model_fields)


def test_shipped_sinks_keep_their_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """OUTBOX_RELAY_NATS_* and OUTBOX_RELAY_WEBHOOK_* keep today's names."""
    monkeypatch.setenv("OUTBOX_RELAY_NATS_SUBJECT_PREFIX", "orders.")
    monkeypatch.setenv("OUTBOX_RELAY_WEBHOOK_TIMEOUT", "2.5")
    assert load(NatsSettings).subject_prefix == "orders."
    assert load(WebhookSettings).timeout == 2.5
    monkeypatch.setenv("OUTBOX_RELAY_NATS_TIMEOUT", "nan")
    with pytest.raises(SettingsError) as caught:
        load(NatsSettings)
    assert caught.value.variable == "OUTBOX_RELAY_NATS_TIMEOUT"


def test_a_webhook_timeout_above_job_timeout_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """WEBHOOK_TIMEOUT above JOB_TIMEOUT is a settings error naming OUTBOX_RELAY_WEBHOOK_TIMEOUT: a request
    the job's deadline cuts may already have been accepted (a duplicate)."""
    monkeypatch.setenv("OUTBOX_RELAY_WEBHOOK_URL", "http://127.0.0.1:9/hook")
    monkeypatch.setenv("OUTBOX_RELAY_WEBHOOK_SECRET", "whsec_" + "QUJDREVGR0hJSktMTU5PUA==")
    monkeypatch.setenv("OUTBOX_RELAY_WEBHOOK_TIMEOUT", "20")
    settings = load_settings({"database_url": DB, "routes": "ev.*=webhook", "job_timeout": 10})
    with pytest.raises(SettingsError) as caught:
        plugins(settings, HandlerRegistry())
    assert caught.value.variable == "OUTBOX_RELAY_WEBHOOK_TIMEOUT"
    assert "JOB_TIMEOUT" in str(caught.value)
