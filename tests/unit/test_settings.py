"""Settings: contract defaults, OUTBOX_RELAY_* variables, validation naming the variable, secrets."""

from __future__ import annotations

import re

import pytest

from outbox_relay.config import load, redact_url
from outbox_relay.exceptions import SettingsError
from outbox_relay.identity import derived_name as derived_subscription_name
from outbox_relay.identity import job_namespace
from outbox_relay.settings import Settings, env_name, load_settings
from outbox_relay.sinks.webhook import WebhookSettings

PASSWORD = "hunter2-s3cret"


#: No OUTBOX_RELAY_* variable of the developer's shell leaks into a test.
pytestmark = pytest.mark.usefixtures("clean_env")


def test_defaults_match_the_contract_table() -> None:
    """With no variables set, every default is the one the contract's settings table promises."""
    settings = load_settings()
    assert settings.database_url is None
    assert settings.primary_url is None
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert settings.queue_name is None, "derived from the service database once connected"
    assert settings.sweep_interval == 5
    assert settings.requeue_after == 60
    assert settings.max_attempts == 5
    assert settings.subscription_name is None


def test_variables_with_the_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every contract setting is read from its OUTBOX_RELAY_* environment variable."""
    monkeypatch.setenv("OUTBOX_RELAY_DATABASE_URL", "postgresql://svc@db.example/svc")
    monkeypatch.setenv("OUTBOX_RELAY_PRIMARY_URL", "postgres://backend@primary.example/main")
    monkeypatch.setenv("OUTBOX_RELAY_REDIS_URL", "rediss://cache.example:6380/3")
    monkeypatch.setenv("OUTBOX_RELAY_QUEUE_NAME", "orders")
    monkeypatch.setenv("OUTBOX_RELAY_SWEEP_INTERVAL", "0.5")
    monkeypatch.setenv("OUTBOX_RELAY_REQUEUE_AFTER", "7")
    monkeypatch.setenv("OUTBOX_RELAY_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("OUTBOX_RELAY_SUBSCRIPTION_NAME", "orders_sub")
    settings = load_settings()
    assert settings.require_database_url() == "postgresql://svc@db.example/svc"
    assert settings.require_primary_url() == "postgres://backend@primary.example/main"
    assert settings.redis_url.get_secret_value() == "rediss://cache.example:6380/3"
    assert settings.queue_name == "orders"
    assert settings.sweep_interval == 0.5
    assert settings.requeue_after == 7
    assert settings.max_attempts == 1
    assert settings.subscription_name == "orders_sub"


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare QUEUE_NAME (no OUTBOX_RELAY_ prefix) does not change the setting."""
    monkeypatch.setenv("QUEUE_NAME", "not_ours")
    assert load_settings().queue_name is None


def test_command_line_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An override passed by the CLI replaces the environment's value."""
    monkeypatch.setenv("OUTBOX_RELAY_SWEEP_INTERVAL", "9")
    assert load_settings({"sweep_interval": 2.0}).sweep_interval == 2.0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_RELAY_SWEEP_INTERVAL", "0"),
        ("OUTBOX_RELAY_SWEEP_INTERVAL", "-1"),
        ("OUTBOX_RELAY_SWEEP_INTERVAL", "abc"),
        ("OUTBOX_RELAY_REQUEUE_AFTER", "0"),
        ("OUTBOX_RELAY_REQUEUE_AFTER", "-5"),
        ("OUTBOX_RELAY_MAX_ATTEMPTS", "0"),
        ("OUTBOX_RELAY_MAX_ATTEMPTS", "1.5"),
        ("OUTBOX_RELAY_DATABASE_URL", f"mysql://root:{PASSWORD}@db.example/app"),
        ("OUTBOX_RELAY_PRIMARY_URL", "http://primary.example/"),
        ("OUTBOX_RELAY_REDIS_URL", "http://cache.example:6379/0"),
        ("OUTBOX_RELAY_SUBSCRIPTION_NAME", "Bad-Name"),
        ("OUTBOX_RELAY_SUBSCRIPTION_NAME", "x" * 64),
        ("OUTBOX_RELAY_QUEUE_NAME", "x" * 201),
    ],
)
def test_invalid_value_raises_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Each invalid value is a SettingsError whose message names exactly the bad variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.variable == variable
    message = str(caught.value)
    assert variable in message
    assert "\n" not in message
    assert PASSWORD not in message


@pytest.mark.parametrize(
    "variable",
    [
        "OUTBOX_RELAY_DATABASE_URL",
        "OUTBOX_RELAY_PRIMARY_URL",
        "OUTBOX_RELAY_SUBSCRIPTION_CONNINFO",
        "OUTBOX_RELAY_SUBSCRIPTION_NAME",
        "OUTBOX_RELAY_QUEUE_NAME",
    ],
)
def test_an_empty_optional_setting_is_unset(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """Issue 15.6: ``VAR=`` (an env file's way of leaving it out) on a setting that may be unset is
    unset, not an invalid value; a required setting left empty stays an error (QUEUE_NAME above)."""
    monkeypatch.setenv(variable, "")
    settings = load_settings()
    assert getattr(settings, variable.removeprefix("OUTBOX_RELAY_").lower()) is None


def test_empty_webhook_url_and_secret_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The webhook sink's optional URL and secret left empty are unset: the sink says they are required."""
    monkeypatch.setenv("OUTBOX_RELAY_WEBHOOK_URL", "")
    monkeypatch.setenv("OUTBOX_RELAY_WEBHOOK_SECRET", "")
    settings = load(WebhookSettings)
    assert settings.url is None
    assert settings.secret is None


def test_first_of_several_bad_variables_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """With only MAX_ATTEMPTS wrong, the error names it and not some other variable."""
    monkeypatch.setenv("OUTBOX_RELAY_SWEEP_INTERVAL", "3")
    monkeypatch.setenv("OUTBOX_RELAY_MAX_ATTEMPTS", "0")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.variable == "OUTBOX_RELAY_MAX_ATTEMPTS"
    assert "SWEEP_INTERVAL" not in str(caught.value)


def test_env_name_is_the_prefixed_upper_case_field() -> None:
    """env_name maps a field to the variable an operator sets."""
    assert env_name("sweep_interval") == "OUTBOX_RELAY_SWEEP_INTERVAL"


def test_require_database_url_names_the_variable_when_missing() -> None:
    """Without DATABASE_URL, require_database_url raises a SettingsError naming OUTBOX_RELAY_DATABASE_URL."""
    with pytest.raises(SettingsError) as caught:
        load_settings().require_database_url()
    assert caught.value.variable == "OUTBOX_RELAY_DATABASE_URL"
    assert "OUTBOX_RELAY_DATABASE_URL" in str(caught.value)


def test_require_primary_url_names_the_variable_when_missing() -> None:
    """Without PRIMARY_URL, require_primary_url raises a SettingsError naming OUTBOX_RELAY_PRIMARY_URL."""
    with pytest.raises(SettingsError) as caught:
        Settings(database_url="postgresql://h/svc").require_primary_url()
    assert "OUTBOX_RELAY_PRIMARY_URL" in str(caught.value)


@pytest.mark.parametrize(
    ("database", "prefix"),
    [
        ("orders", "outbox_relay_orders_"),
        ("My-Service.DB", "outbox_relay_my_service_db_"),
        ("billing_2", "outbox_relay_billing_2_"),
    ],
)
def test_derived_subscription_name_keeps_a_readable_prefix(database: str, prefix: str) -> None:
    """The derived name is outbox_relay_<sanitised database>_<12 hex of the database's identity>."""
    name = derived_subscription_name(database, "7301234567890123456", 16384)
    assert name.startswith(prefix)
    assert re.fullmatch(r"[0-9a-f]{12}", name.removeprefix(prefix))


def test_derived_subscription_name_is_a_valid_identifier_of_at_most_63_chars() -> None:
    """A long or odd database name still gives a name that passes the SUBSCRIPTION_NAME check."""
    name = derived_subscription_name("Ünïcode-" + "x" * 100, "7301234567890123456", 16384)
    assert len(name) <= 63
    assert Settings(subscription_name=name).subscription_name == name


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("svc-a", "1", 16384), ("svc_a", "1", 16385)),  # same sanitised name, one cluster
        (("App", "1", 16384), ("app", "1", 16390)),  # case only
        (("app", "1", 16384), ("app", "2", 16384)),  # same name and oid, two clusters
    ],
)
def test_databases_that_sanitise_alike_get_different_names(
    first: tuple[str, str, int], second: tuple[str, str, int]
) -> None:
    """Names that collided under the old default (svc-a/svc_a, App/app, two `app`s) now differ."""
    assert derived_subscription_name(*first) != derived_subscription_name(*second)


def test_explicit_subscription_name_is_kept_as_is() -> None:
    """SUBSCRIPTION_NAME, when set, is the override subscribe and unsubscribe use."""
    settings = Settings(database_url="postgresql://h/orders", subscription_name="custom_sub")
    assert settings.subscription_name == "custom_sub"


def test_urls_stay_out_of_repr_and_str() -> None:
    """Passwords (and whole URLs) of every URL setting are hidden in repr() and str() of Settings."""
    settings = Settings(
        database_url=f"postgresql://svc:{PASSWORD}@db.example/svc",
        primary_url=f"postgresql://backend:{PASSWORD}@primary.example/main",
        redis_url=f"redis://:{PASSWORD}@cache.example/0",
        subscription_conninfo=f"host=primary.example password={PASSWORD}",
    )
    for text in (repr(settings), str(settings)):
        assert PASSWORD not in text
        assert "db.example" not in text
    assert settings.require_database_url() == f"postgresql://svc:{PASSWORD}@db.example/svc"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://svc:pw@db.example:5432/svc", "postgresql://svc:***@db.example:5432/svc"),
        ("redis://:pw@cache.example/0", "redis://:***@cache.example/0"),
        ("postgresql://svc:p%40ss@h/db?sslmode=require", "postgresql://svc:***@h/db?sslmode=require"),
    ],
)
def test_redact_url_hides_the_password(url: str, expected: str) -> None:
    """redact_url replaces the password with *** and keeps the rest readable."""
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url", ["postgresql://svc@db.example/svc", "redis://127.0.0.1:6379/0", "postgresql:///svc?host=/tmp"]
)
def test_redact_url_leaves_password_less_urls_alone(url: str) -> None:
    """A URL without a password comes back unchanged."""
    assert redact_url(url) == url


def test_handler_modules_parses_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """OUTBOX_RELAY_HANDLER_MODULES='a, b,,c ' becomes ('a', 'b', 'c')."""
    monkeypatch.setenv("OUTBOX_RELAY_HANDLER_MODULES", "myapp.handlers, other.mod,,third ")
    assert load_settings().handler_modules == ("myapp.handlers", "other.mod", "third")


def test_handler_modules_single_module_and_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """One module gives a one-tuple; an empty value gives no modules."""
    monkeypatch.setenv("OUTBOX_RELAY_HANDLER_MODULES", "myapp.handlers")
    assert load_settings().handler_modules == ("myapp.handlers",)
    monkeypatch.setenv("OUTBOX_RELAY_HANDLER_MODULES", "")
    assert load_settings().handler_modules == ()


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    """OUTBOX_RELAY_LOG_LEVEL=debug is accepted as DEBUG."""
    monkeypatch.setenv("OUTBOX_RELAY_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"


def test_job_namespace_contains_the_queue_name() -> None:
    """Two queue names give two job namespaces."""
    assert job_namespace("a") != job_namespace("b")
