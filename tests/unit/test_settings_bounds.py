"""Every interval and count is bounded on both sides; URL ports are numbers (issue 7, item 5)."""

from __future__ import annotations

import pytest

from outbox_relay.exceptions import SettingsError
from outbox_relay.settings import load_settings

#: Values no interval may take: infinite, not a number, beyond float, absurdly large.
HUGE_FLOATS = ("inf", "-inf", "nan", "1e400", "1e12")

INTERVALS = {
    # variable: (largest accepted, smallest refused above it)
    "OUTBOX_RELAY_SWEEP_INTERVAL": ("3600", "3600.5"),
    "OUTBOX_RELAY_REQUEUE_AFTER": ("86400", "86401"),
    "OUTBOX_RELAY_JOB_TIMEOUT": ("3600", "3601"),
    "OUTBOX_RELAY_RETRY_BACKOFF": ("86400", "86401"),
    "OUTBOX_RELAY_RETRY_BACKOFF_MAX": ("86400", "86401"),
    "OUTBOX_RELAY_WORKER_POLL_DELAY": ("60", "61"),
    "OUTBOX_RELAY_PRUNE_INTERVAL": ("86400", "86401"),
    "OUTBOX_RELAY_RETENTION": ("315360000", "315360001"),
}

COUNTS = {
    "OUTBOX_RELAY_MAX_ATTEMPTS": ("100", "101"),
    "OUTBOX_RELAY_WORKER_CONCURRENCY": ("1000", "1001"),
    "OUTBOX_RELAY_MAX_QUEUE_DEPTH": ("10000000", "10000001"),
    "OUTBOX_RELAY_BATCH_SIZE": ("10000", "10001"),
    "OUTBOX_RELAY_PRUNE_BATCH_SIZE": ("100000", "100001"),
}


#: No OUTBOX_RELAY_* variable of the developer's shell leaks into a test.
pytestmark = pytest.mark.usefixtures("clean_env")


def _refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> SettingsError:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return caught.value


@pytest.mark.parametrize("value", HUGE_FLOATS)
@pytest.mark.parametrize("variable", sorted(INTERVALS))
def test_non_finite_or_huge_interval_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """inf, nan, 1e400 and 1e12 are a SettingsError naming exactly that interval's variable."""
    error = _refused(monkeypatch, variable, value)
    assert error.variable == variable
    assert "\n" not in str(error)


@pytest.mark.parametrize(("variable", "limits"), sorted(INTERVALS.items()) + sorted(COUNTS.items()))
def test_upper_bound_is_inclusive_and_one_past_it_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, limits: tuple[str, str]
) -> None:
    """The documented maximum is accepted; just above it is refused, naming the variable."""
    largest, too_large = limits
    monkeypatch.setenv(variable, largest)
    settings = load_settings()
    assert float(getattr(settings, variable.removeprefix("OUTBOX_RELAY_").lower())) == float(largest)
    assert _refused(monkeypatch, variable, too_large).variable == variable


@pytest.mark.parametrize("value", ["99999999999999999999999", "1000000", str(2**31 - 1), "-1", "0"])
@pytest.mark.parametrize("variable", sorted(COUNTS))
def test_huge_or_non_positive_count_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Counts no machine could honour (and counts below 1) are refused naming the variable."""
    if variable == "OUTBOX_RELAY_MAX_QUEUE_DEPTH" and value == "1000000":
        value = "100000000"  # a million is a sane queue depth; a hundred million is not
    assert _refused(monkeypatch, variable, value).variable == variable


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("OUTBOX_RELAY_DATABASE_URL", "postgresql://u@h:abc/db"),
        ("OUTBOX_RELAY_DATABASE_URL", "postgresql://u@h:0/db"),
        ("OUTBOX_RELAY_DATABASE_URL", "postgresql://u@h:65536/db"),
        ("OUTBOX_RELAY_DATABASE_URL", "postgresql://u@h1:5432,h2:x/db"),
        ("OUTBOX_RELAY_PRIMARY_URL", "postgres://u:pw@h:5432x/db"),
        ("OUTBOX_RELAY_REDIS_URL", "redis://h:xx/0"),
        ("OUTBOX_RELAY_REDIS_URL", "rediss://:pw@h:-1/0"),
    ],
)
def test_non_numeric_port_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, url: str
) -> None:
    """A URL whose port is not a number 1-65535 is a SettingsError naming the URL's variable."""
    error = _refused(monkeypatch, variable, url)
    assert error.variable == variable
    assert "pw" not in str(error)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h:5432/db",
        "postgresql://u@h/db",
        "postgresql://u@[::1]:5432/db",
        "postgresql://u@h1:5432,h2:5433/db",
        "postgresql:///db?host=/var/run/postgresql",
    ],
)
def test_well_formed_ports_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Numeric ports, no port, IPv6 literals, several hosts and socket URLs all pass."""
    monkeypatch.setenv("OUTBOX_RELAY_DATABASE_URL", url)
    assert load_settings().require_database_url() == url
