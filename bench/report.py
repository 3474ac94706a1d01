"""What the bench prints: progress on stderr (:func:`say`), the results table on stdout (:func:`render`)."""

from __future__ import annotations

import sys
from typing import Any

from bench.results import Results


def say(text: str = "") -> None:
    """Progress lines go to stderr, the results table to stdout."""
    print(text, file=sys.stderr, flush=True)


def render(results: Results) -> str:
    """The results as a plain-text table."""
    data = results.as_json()
    sections = (
        _header,
        _scaling,
        _drains,
        _latency,
        _backlog,
        _table_scale,
        _cpu,
        _sinks,
        _targets,
        _sink_targets,
    )
    return "\n".join(line for section in sections for line in section(data))


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _header(data: dict[str, Any]) -> list[str]:
    mode = "durable (fsync on, synchronous_commit on)" if data["durable"] else "fsync off"
    machine = data["machine"]
    lines = [
        f"outbox_relay bench  ({machine['cpus']} CPUs, {machine['memory_gb']} GB, "
        f"Python {machine['python']}; PostgreSQL {mode}; JOB_BATCH_SIZE {data['job_batch_size']}; "
        f"{data['accounts']} ledger account(s))",
        "",
    ]
    commits = data["commit_rate_with_notify_trigger_per_s"]
    if commits:
        lines.append(
            "commit rate, single-row outbox inserts with the notify trigger: "
            + ", ".join(f"{n} producer(s) {r:,.0f}/s" for n, r in commits.items())
        )
        lines.append("")
    return lines


def _scaling(data: dict[str, Any]) -> list[str]:
    lines = ["workers  arq no-op ceiling  end-to-end  ratio   CPU s per 1,000 events: workers, all"]
    for n, row in data["scaling"].items():
        ceiling = row["ceiling_jobs_per_s"]
        events = row["events_per_s"]
        ratio = row["ratio"]
        cpu = row.get("cpu_seconds_per_1000_events") or {}
        lines.append(
            f"{n:>7}  {ceiling or 0:>13,.0f}/s  {events or 0:>8,.0f}/s  "
            f"{ratio if ratio is not None else float('nan'):>5.2f}   "
            f"{_num(cpu.get('workers')):>7} {_num(cpu.get('all')):>6}"
        )
        if len(row.get("events_per_s_rounds") or []) > 1:
            lines.append(
                "           rounds: ceiling "
                + ", ".join(f"{v:,.0f}" for v in row["ceiling_rounds"])
                + "; end to end "
                + ", ".join(f"{v:,.0f}" for v in row["events_per_s_rounds"])
            )
    return lines


def _drains(data: dict[str, Any]) -> list[str]:
    drains = {n: row for n, row in data["scaling"].items() if row.get("drain_events_per_s")}
    if not drains:
        return []
    lines = ["", "backlog drain by workers (warm workers, relay started last; first to last finished_at)"]
    for n, row in drains.items():
        rounds = ", ".join(f"{v:,.0f}" for v in row["drain_rounds"])
        busy = ", ".join(f"{v:.2f}" for v in row.get("drain_cores_busy_rounds") or [])
        lines.append(f"{n:>7}  {row['drain_events_per_s']:>10,.0f}/s   rounds: {rounds}   cores busy: {busy}")
    return lines


def _latency(data: dict[str, Any]) -> list[str]:
    lines = ["", "latency commit -> finished (ms)   p50     p95     p99     max   (to queued: p50, p99)"]
    for rate, lat in data["latency_ms"].items():
        lines.append(
            f"  at {rate:>4} events/s offered   {lat['p50']:>6.1f}  {lat['p95']:>6.1f}  "
            f"{lat['p99']:>6.1f}  {lat['max']:>6.1f}   ({lat['p50_queued']:.1f}, {lat['p99_queued']:.1f})"
        )
    return lines


def _backlog(data: dict[str, Any]) -> list[str]:
    b = data["backlog"]
    if not b:
        return []
    lines = [
        "",
        f"backlog: {int(b['rows']):,} rows drained in {b['drain_seconds']:.1f} s "
        f"({b['drain_events_per_s']:,.0f}/s); peak RSS relay {b['relay_peak_rss_mb']:.0f} MB, "
        f"worker {b['worker_peak_rss_mb']:.0f} MB",
    ]
    per_row = data["backlog_one_row_per_job"]
    if per_row:
        lines.append(
            f"  with one row per job: {per_row['drain_seconds']:.1f} s "
            f"({per_row['drain_events_per_s']:,.0f}/s)"
        )
    return lines


def _table_scale(data: dict[str, Any]) -> list[str]:
    t = data["table_scale"]
    if not t:
        return []
    lines = ["", f"table scale (median ms, alternating)   0 rows   {t['finished_rows']:,} finished rows"]
    for key in t["empty_ms"]:
        lines.append(f"  {key:<34} {t['empty_ms'][key]:>7.2f}   {t['full_ms'][key]:>7.2f}")
    lines.append("  buffers touched per query             0 rows   with finished rows")
    for key in t["empty_buffers"]:
        lines.append(f"  {key:<34} {t['empty_buffers'][key]:>7}   {t['full_buffers'][key]:>7}")
    scans = [k for k, v in t["hot_path_plans_scan_table"].items() if v]
    lines.append("  hot-path plans that scan the table: " + (", ".join(scans) if scans else "none"))
    if t.get("prune"):
        p = t["prune"]
        lines.append(f"  prune: {int(p['rows']):,} rows in {p['seconds']:.1f} s ({p['rows_per_s']:,.0f}/s)")
    return lines


def _cpu(data: dict[str, Any]) -> list[str]:
    lines = []
    cpu = data["cpu_seconds_per_1000_events"]
    if cpu:
        parts = [f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in cpu.items()]
        lines += ["", "CPU seconds per 1,000 events: " + ", ".join(parts)]
    idle = data["idle_cpu_percent_of_a_core"]
    if idle:
        lines.append("idle CPU, % of a core: " + ", ".join(f"{k} {v:.2f}" for k, v in idle.items()))
    return lines


def _sink_row(name: str, route: dict[str, Any]) -> str:
    if "skipped" in route:
        return f"  {name:<18} skipped: {route['skipped']}"
    ratio = route.get("ratio_to_reservation_path")
    cpu = route["cpu_seconds_per_1000_events"]["relay_and_workers"]
    delivered = f"{route['delivered']:,}/{route['events']:,}"
    failed = f", {route['failed_rows']:,} failed" if route["failed_rows"] else ""
    return (
        f"  {name:<18} {route['events_per_s'] or 0:>9,.0f}  {_num(ratio):>6}  {cpu:>9.2f}  "
        f"{delivered:>13}  {route['longest_idle_in_transaction_s']:>8.2f}  "
        f"{route['cores_busy']:>9.2f}{failed}"
    )


def _sinks(data: dict[str, Any]) -> list[str]:
    sinks, slow = data["sinks"], data["webhook_50ms"]
    if not sinks and not slow["runs"]:
        return []
    reference = data["sinks_reference"]
    workers = next((r["workers"] for r in sinks.values() if "workers" in r), data["workers"])
    lines = [
        "",
        f"sink routes ({workers} worker(s); the rows of each run committed in one transaction on the "
        "primary; commit -> last finished)",
        "  route               events/s   ratio   CPU s per   delivered /   longest idle   cores",
        "                                         1,000 ev.*      events   in transaction    busy**",
        f"  {'reservation path':<18} {reference['events_per_s'] or 0:>9,.0f}  {1.0:>6.2f}  "
        f"{_num(reference['cpu_relay_and_workers_per_1000_events']):>9}",
    ]
    lines += [_sink_row(name, route) for name, route in sinks.items()]
    lines.append("  * relay and workers together (PostgreSQL, Redis and the destination not counted)")
    lines.append(
        f"  ** of the machine's {data['machine']['cpus']}, every process counted, commit to last finished"
    )
    if slow["runs"]:
        lines.append("webhook answering after 50 ms, by worker processes:")
        lines += [_sink_row(f"{n} worker(s)", route) for n, route in slow["runs"].items()]
        if slow["ratio_2_to_1"] is not None:
            lines.append(
                f"  2 workers / 1 worker: {slow['ratio_2_to_1']:.2f}x "
                f"(first to last finished: {_num(slow['ratio_2_to_1_first_to_last_finished'])}x)"
            )
    runs = {**sinks, **{f"webhook 50 ms, {n} worker(s)": r for n, r in slow["runs"].items()}}
    lines.append(
        "CPU seconds per 1,000 events by process (destination: the server the sink delivers to; "
        "bench: the producer and the pollers)"
    )
    for name, route in runs.items():
        if "skipped" not in route:
            cpu = route["cpu_seconds_per_1000_events"]
            keys = ("relay", "workers", "postgresql", "redis", "destination", "bench")
            other = f"; cores busy by other processes {_num(route.get('cores_busy_other'))}"
            lines.append(f"  {name:<28} " + ", ".join(f"{k} {_num(cpu.get(k))}" for k in keys) + other)
    return lines


def _targets(data: dict[str, Any]) -> list[str]:
    return _target_table("targets (issue 8)", data["targets"])


def _sink_targets(data: dict[str, Any]) -> list[str]:
    return _target_table("targets (issue 16, sinks)", data["sink_targets"]) if data["sink_targets"] else []


def _target_table(title: str, targets: list[dict[str, Any]]) -> list[str]:
    lines = ["", f"{title:<61}value   target   met"]
    for t in targets:
        value = "" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        lines.append(f"  {t['measure']:<58} {value:>7}  {t['target']:>7}  {met}")
    return lines
