"""deploy/prometheus/alerts.yml: valid rules over the documented metric names only.

With `promtool` on PATH (Debian's `prometheus` package) the rules are also checked by
`promtool check rules`, which parses every PromQL expression: the test is stricter then.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"

#: Contract section 6 plus the extras of the metrics module (counters with their _total).
DOCUMENTED_METRICS = {
    "outbox_relay_rows",
    "outbox_relay_oldest_pending_age_seconds",
    "outbox_relay_relay_active",
    "outbox_relay_handed_over_total",
    "outbox_relay_events_total",
    "outbox_relay_commit_to_finish_seconds",
    "outbox_relay_subscription_enabled",
    "outbox_relay_subscription_apply_errors_total",
    "outbox_relay_subscription_sync_errors_total",
    "outbox_relay_workers_live",
}
WANTED = {
    "OutboxRelayNoActiveRelay",
    "OutboxRelayPendingRowsOld",
    "OutboxRelayFailedRowsIncreasing",
    "OutboxRelaySubscriptionDisabled",
    "OutboxRelaySubscriptionErrors",
    "OutboxRelayNoLiveWorker",
}


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_wanted_alert_is_there_with_summary_and_severity() -> None:
    """The issue's alerts exist, each with an expression, a severity and a summary."""
    rules = {r["alert"]: r for r in _rules()}
    assert set(rules) == WANTED
    for name, rule in rules.items():
        assert isinstance(rule["expr"], str), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name  # type: ignore[index]
        assert rule["annotations"]["summary"], name  # type: ignore[index]
    assert rules["OutboxRelayNoActiveRelay"]["for"] == "1m"


def test_expressions_use_only_documented_metrics() -> None:
    """Every outbox_relay_* name in an expression is a documented metric (a typo never alerts)."""
    for rule in _rules():
        names = set(re.findall(r"\boutbox_relay_[a-z_]+", str(rule["expr"])))
        assert names, rule["alert"]
        assert names <= DOCUMENTED_METRICS, (rule["alert"], names - DOCUMENTED_METRICS)


def test_promtool_accepts_the_rules() -> None:
    """`promtool check rules` accepts the file, when promtool is installed (else the parse above stands)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        import pytest

        pytest.skip("promtool not installed (apt-get install prometheus): checked by parsing only")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
