"""deploy/prometheus/alerts.yml: valid rules over the documented metric names only.

The expressions are checked against the metric names the processes really expose
(always); `promtool check rules` parses the PromQL and `promtool test rules` runs
deploy/prometheus/alerts_test.yml, which proves the alerts fire on synthetic series
(tests/integration/test_alerts_prometheus.py proves them in a real Prometheus).
promtool comes from PATH or Debian's `prometheus` package (tests/tools.py); where it
can't be had those tests fail, unless OUTBOX_RELAY_NO_PROMTOOL=1 opts out.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tools import NO_PROMTOOL, ToolMissing, promtool, promtool_opted_out

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ALERTS.with_name("alerts_test.yml")


def _exposed_metrics() -> set[str]:
    """Every sample name the processes really expose (a relay's registry and a worker's)."""
    from outbox_relay.observability import Metrics

    relay, worker = Metrics("relay"), Metrics("worker")
    relay.handed_over.labels(path="notify").inc()  # labelled families expose samples once used
    worker.events.labels(kind="reservation", result="finished").inc()
    worker.commit_to_finish.labels(kind="reservation").observe(0.01)
    relay.rows.labels(status="new").set(0)
    for gauge in (
        relay.subscription_enabled,
        relay.subscription_apply_errors,
        relay.subscription_sync_errors,
    ):
        gauge.labels(subscription="outbox_relay_svc").set(0)  # exposed once a subscription is found
    return {
        sample.name
        for metrics in (relay, worker)
        for family in metrics.registry.collect()
        for sample in family.samples
    }


#: What the processes expose: a rule over any other name would never fire.
DOCUMENTED_METRICS = _exposed_metrics()
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
    """Every outbox_relay_* name in an expression is a metric the processes expose (a typo never alerts),
    and every rule reads one: none depends on a scrape job's name or on `up`."""
    for rule in _rules():
        expr = str(rule["expr"])
        names = set(re.findall(r"\boutbox_relay_[a-z_]+", expr))
        assert names, rule["alert"]
        assert names <= DOCUMENTED_METRICS, (rule["alert"], names - DOCUMENTED_METRICS)
        assert "job" not in expr, rule["alert"]
        assert not re.search(r"\bup\b", expr), rule["alert"]


def test_the_exposed_metric_list_is_read_from_the_registry() -> None:
    """The list the rules are checked against holds the contract's names, counters with _total."""
    wanted = {"outbox_relay_rows", "outbox_relay_events_total", "outbox_relay_relay_active"}
    assert wanted <= DOCUMENTED_METRICS
    assert "outbox_relay_workers_live" not in DOCUMENTED_METRICS


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool, or fail saying how to get it (pass only when the opt-out is set)."""
    try:
        binary = promtool()
    except ToolMissing as exc:
        if promtool_opted_out():
            pytest.xfail(f"{NO_PROMTOOL}=1: {exc}")  # reported as xfailed, never as passed
        pytest.fail(str(exc))
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=120, cwd=ALERTS.parent
    )


def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts alerts.yml: valid YAML, PromQL and templates, all six rules."""
    result = _promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(WANTED)} rules found" in result.stdout, result.stdout


def test_promtool_unit_tests_prove_the_alerts_fire() -> None:
    """`promtool test rules alerts_test.yml`: on synthetic series every alert fires when it should
    (no active relay, old pending rows, failed rows increasing, no live worker, subscription
    disabled and erroring) and stays quiet when it should not."""
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    assert fired == WANTED
    result = _promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
