"""OUTBOX_RELAY_REDIS_URL's Sentinel form: what it names, what is refused (exit 2, naming the variable)."""

from __future__ import annotations

import pytest

from outbox_relay.arq_adapter import ArqBackend
from outbox_relay.arq_adapter.connection import SENTINEL_PORT, SentinelTarget, parse_sentinel_url
from outbox_relay.exceptions import SettingsError
from outbox_relay.queue.backends import QueueOptions, from_url
from outbox_relay.settings import load_settings
from tests.helpers import cli_env, run_cli

PASSWORD = "s3nt1nel-secret"
VARIABLE = "OUTBOX_RELAY_REDIS_URL"


def test_a_sentinel_url_names_sentinels_service_db_and_credentials() -> None:
    """Hosts (default port 26379, IPv6), service, database, TLS, credentials are read; repr hides them."""
    target = parse_sentinel_url(f"rediss+sentinel://app:{PASSWORD}@s1:26380,[::1]:5,s3/my%20svc/3")
    assert target == SentinelTarget(
        sentinels=(("s1", 26380), ("::1", 5), ("s3", SENTINEL_PORT)),
        service="my svc",
        db=3,
        tls=True,
        username="app",
        password=PASSWORD,
    )
    assert PASSWORD not in repr(target)
    assert parse_sentinel_url("redis+sentinel://h:1/svc").auth() == {}
    assert parse_sentinel_url(f"redis+sentinel://:{PASSWORD}@h:1/svc").auth() == {"password": PASSWORD}


@pytest.mark.parametrize(
    "url",
    [
        f"redis+sentinel://:{PASSWORD}@h1:1,h2:2/mymaster",
        "rediss+sentinel://h1:26379/mymaster/2",
        "redis://127.0.0.1:6379/0",
        "unix:///run/redis.sock",
    ],
)
def test_settings_accept_the_sentinel_schemes(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Both Sentinel schemes are accepted beside the direct ones, and choose the arq backend."""
    monkeypatch.setenv(VARIABLE, url)
    settings = load_settings()
    backend = from_url(settings.redis_url.get_secret_value(), QueueOptions("q", "outbox_relay:q"))
    assert isinstance(backend, ArqBackend)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"redis+sentinel://:{PASSWORD}@h1:1,h2:2", "/SERVICE"),
        (f"redis+sentinel://:{PASSWORD}@h1:1/", "/SERVICE"),
        (f"redis+sentinel://:{PASSWORD}@h1:1/svc/0/extra", "/SERVICE"),
        (f"redis+sentinel://:{PASSWORD}@h1:1/svc/zero", "database number"),
        (f"redis+sentinel://:{PASSWORD}@/svc", "names no sentinel"),
        (f"redis+sentinel://:{PASSWORD}@h1:1,:2/svc", "without a host"),
        (f"redis+sentinel://:{PASSWORD}@h1:99999/svc", "port"),
        (f"redis+sentinel://:{PASSWORD}@h1:1/svc?ssl=1", "no query"),
        (f"sentinel://:{PASSWORD}@h1:1/svc", "redis+sentinel://"),
    ],
)
def test_a_malformed_sentinel_url_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, url: str, problem: str
) -> None:
    """A malformed Sentinel URL is a SettingsError naming OUTBOX_RELAY_REDIS_URL, saying what is wrong,
    never quoting the password."""
    monkeypatch.setenv(VARIABLE, url)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.variable == VARIABLE
    assert problem in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_the_worker_exits_2_on_a_malformed_sentinel_url() -> None:
    """`outbox-relay worker` with a Sentinel URL lacking its service: exit 2, one line naming the variable,
    no password."""
    env = cli_env(
        {
            "OUTBOX_RELAY_DATABASE_URL": "postgresql://svc@192.0.2.1:5432/svc",
            VARIABLE: f"redis+sentinel://:{PASSWORD}@192.0.2.1:26379",
        }
    )
    result = run_cli("worker", env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert VARIABLE in lines[0]
    assert PASSWORD not in result.stdout + result.stderr
