"""Retention settings: defaults, OUTBOX_RELAY_* variables, and validation naming the variable."""

from __future__ import annotations

import pytest

from outbox_relay.exceptions import SettingsError
from outbox_relay.settings import load_settings

#: No OUTBOX_RELAY_* variable of the developer's shell leaks into a test.
pytestmark = pytest.mark.usefixtures("clean_env")


def test_retention_defaults_keep_rows_forever() -> None:
    """With nothing set, rows are kept forever, the prune period is 300 s and batches are 5000 rows."""
    settings = load_settings()
    assert settings.retention is None
    assert settings.prune_interval == 300
    assert settings.prune_batch_size == 5000


def test_retention_settings_are_read_from_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """OUTBOX_RELAY_RETENTION, _PRUNE_INTERVAL and _PRUNE_BATCH_SIZE are read from the environment."""
    monkeypatch.setenv("OUTBOX_RELAY_RETENTION", "604800")
    monkeypatch.setenv("OUTBOX_RELAY_PRUNE_INTERVAL", "60.5")
    monkeypatch.setenv("OUTBOX_RELAY_PRUNE_BATCH_SIZE", "100000")
    settings = load_settings()
    assert settings.retention == 604800
    assert settings.prune_interval == 60.5
    assert settings.prune_batch_size == 100_000


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_RELAY_RETENTION", "0"),
        ("OUTBOX_RELAY_RETENTION", "-1"),
        ("OUTBOX_RELAY_RETENTION", "inf"),
        ("OUTBOX_RELAY_RETENTION", "nan"),
        ("OUTBOX_RELAY_RETENTION", "a week"),
        ("OUTBOX_RELAY_PRUNE_INTERVAL", "0"),
        ("OUTBOX_RELAY_PRUNE_INTERVAL", "-3"),
        ("OUTBOX_RELAY_PRUNE_BATCH_SIZE", "0"),
        ("OUTBOX_RELAY_PRUNE_BATCH_SIZE", "100001"),
        ("OUTBOX_RELAY_PRUNE_BATCH_SIZE", "1.5"),
    ],
)
def test_bad_retention_settings_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A retention, interval or batch size out of range is a SettingsError naming the variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.variable == variable
