"""The newcomer's first command (`demo`) and the benchmark's smoke run (`./dev bench --quick`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import REPO, cli_env, run_cli
from tests.servers import RABBITMQ_ENV, RABBITMQ_LOCAL, amqp_answers


def test_demo_completes_on_embedded_servers_with_every_check_passing() -> None:
    """`demo` with no settings starts embedded servers, drives a load and reports all checks ok."""
    result = run_cli("demo", "--events", "400", "--rate", "200", env=cli_env({}), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[ok] nothing lost: all 400 events replicated and finished" in out
    assert "[ok] 4 poison rows quarantined as failed" in out
    assert "[ok] every effect applied once" in out
    assert "[ok] money conserved" in out
    for word in ("p50", "p99", "events/s"):
        assert word in out
    assert "FAILED" not in out
    assert "cleaned up" in out
    # Piped, the progress stays plain lines (the live view is for terminals only).
    assert re.search(r"^  replicated +\d+/\d+  queued +\d+  finished +\d+  failed +\d+$", out, re.M), out
    assert "\x1b" not in out


def test_bench_quick_writes_the_results_with_the_ratio_to_the_arq_ceiling(tmp_path: Path) -> None:
    """`python -m bench --quick --json PATH` (what `./dev bench` runs) measures everything, writes the
    ratio under ratio_to_arq_ceiling and each sink route's figures under sinks and webhook_50ms."""
    path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(path)],
        env=cli_env({}),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    data = json.loads(path.read_text())
    assert data["ratio_to_arq_ceiling"] > 0
    assert data["arq_noop_ceiling_jobs_per_s"] > 0
    assert data["throughput_events_per_s"] > 0
    latency = data["latency_ms"]["100"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert data["backlog"]["rows"] == 1000
    assert data["scaling"]["1"]["drain_events_per_s"] > 0, "no backlog drained by the worker count"
    [busy] = data["scaling"]["1"]["drain_cores_busy_rounds"]
    assert 0 < busy <= (os.cpu_count() or 1) + 0.01, busy
    assert "backlog drain by workers" in result.stdout
    assert data["backlog"]["relay_peak_rss_mb"] > 0
    scale = data["table_scale"]
    assert not any(scale["hot_path_plans_scan_table"].values()), scale["hot_path_plans_scan_table"]
    assert set(data["cpu_seconds_per_1000_events"]) >= {"relay", "workers", "postgresql", "redis"}
    assert data["durable"] is True, "the bench's headline must be the durable mode"
    assert data["machine"]["postgresql"]["fsync"] == "on"
    assert set(data["commit_rate_with_notify_trigger_per_s"]) == {"1", "4"}
    assert all(rate > 0 for rate in data["commit_rate_with_notify_trigger_per_s"].values())
    idle = data["idle_cpu_percent_of_a_core"]
    assert set(idle) == {"relay", "worker (max)"}
    assert all(0 <= v < 100 for v in idle.values())
    assert {t["measure"] for t in data["targets"]} >= {"p50 ms at 100 events/s"}
    assert "arq no-op ceiling" in result.stdout
    assert "targets (issue 8)" in result.stdout
    assert "latency commit -> finished" in result.stdout
    _assert_sink_routes(data, result.stdout)


def _assert_sink_routes(data: dict[str, Any], stdout: str) -> None:
    """Each sink route measured (rabbitmq skipped only where no broker answers), every event
    delivered once, the longest idle-in-transaction recorded, the table printed."""
    sinks = data["sinks"]
    assert set(sinks) >= {"nats", "rabbitmq", "webhook"}, sinks
    if "skipped" in sinks["rabbitmq"]:
        assert not amqp_answers(os.environ.get(RABBITMQ_ENV) or RABBITMQ_LOCAL), sinks["rabbitmq"]
        del sinks["rabbitmq"]
    runs = [*sinks.values(), *data["webhook_50ms"]["runs"].values()]
    assert set(data["webhook_50ms"]["workers"]) == {"1", "2"}
    assert all(rate > 0 for rate in data["webhook_50ms"]["workers"].values())
    for route in sinks.values():
        assert route["ratio_to_reservation_path"] > 0, route
    for route in runs:
        assert route["events_per_s"] > 0, route
        assert route["delivered"] == route["events"] == 200, route
        assert route["failed_rows"] == 0, route
        assert 0 <= route["longest_idle_in_transaction_s"] < 60, route
        assert route["activity_samples"] > 0, route
        assert route["cpu_seconds_per_1000_events"]["relay_and_workers"] >= 0, route
    assert data["sinks_reference"]["events_per_s"] == data["throughput_events_per_s"]
    assert "sink routes (" in stdout
    assert "webhook answering after 50 ms" in stdout
    assert "targets (issue 16, sinks)" in stdout


def test_demo_sink_nats_shows_messages_arriving_and_every_event_once() -> None:
    """`demo --sink nats` routes events into an embedded nats-server and its checks all pass."""
    result = run_cli("demo", "--sink", "nats", "--events", "300", env=cli_env({}), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "← outbox.demo.order_" in result.stdout
    assert "[ok] 300 rows finished, 300 messages in the stream" in result.stdout
    assert "FAILED" not in result.stdout
