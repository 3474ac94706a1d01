"""Everything the bench measured (:class:`Results`), its targets, and its JSON shape."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Results:
    """Everything measured, as printed and as JSON."""

    machine: dict[str, Any] = field(default_factory=dict)
    ceiling: dict[int, float] = field(default_factory=dict)
    throughput: dict[int, float] = field(default_factory=dict)
    latency: dict[float, dict[str, float]] = field(default_factory=dict)
    backlog: dict[str, float] = field(default_factory=dict)
    table: dict[str, Any] = field(default_factory=dict)
    cpu_per_1000: dict[str, float | None] = field(default_factory=dict)
    #: CPU seconds per 1,000 events of the throughput run, by worker processes: the
    #: workers' together, and everything (relay, workers, PostgreSQL, Redis).
    cpu_by_workers: dict[int, dict[str, float | None]] = field(default_factory=dict)
    #: Each round's figures (``ceiling`` and ``throughput`` are their medians).
    ceiling_runs: dict[int, list[float]] = field(default_factory=dict)
    throughput_runs: dict[int, list[float]] = field(default_factory=dict)
    #: Backlog drain rate (rows per second of finishing) by worker processes, each round.
    drain_runs: dict[int, list[float]] = field(default_factory=dict)
    #: Cores busy (the whole machine) during each of those drains.
    drain_cores_busy: dict[int, list[float]] = field(default_factory=dict)
    workers: int = 2
    durable: bool = True
    #: Single-row outbox insert commits per second, by producer connections.
    commit_rate: dict[int, float] = field(default_factory=dict)
    #: Percent of one core with nothing to do: relay, and each worker.
    idle_cpu: dict[str, float] = field(default_factory=dict)
    backlog_per_row: dict[str, float] = field(default_factory=dict)
    job_batch_size: int = 0
    accounts: int = 0
    #: Each sink route (bench.sinks) by name: events/s from the commit to the last finished,
    #: messages delivered, CPU, longest idle in transaction; or why it was skipped.
    sinks: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The webhook answering after 50 ms, by worker processes.
    webhook_50ms: dict[int, dict[str, Any]] = field(default_factory=dict)

    def targets(self) -> list[tuple[str, float | None, str, bool | None]]:
        """(measure, value, target, met) for each target of issue 8."""

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        out: list[tuple[str, float | None, str, bool | None]] = []
        for n in (1, 2):
            r = ratio(self.throughput.get(n), self.ceiling.get(n))
            out.append((f"end to end / arq no-op ceiling, {n} worker(s)", r, ">= 1.5", met(r, 1.5)))
        ns = sorted(self.throughput)
        if len(ns) > 1:
            rates = [self.throughput[n] for n in ns]
            ok = all(a <= b for a, b in itertools.pairwise(rates))
            label = " >= ".join(str(n) for n in reversed(ns)) + " workers in events/s"
            out.append((label, None, "monotone", ok))
        drains = {n: statistics.median(v) for n, v in sorted(self.drain_runs.items()) if v}
        if len(drains) > 1:
            ok = all(a <= b for a, b in itertools.pairwise(drains.values()))
            label = " >= ".join(str(n) for n in reversed(drains)) + " workers, backlog drain (no producers)"
            out.append((label, None, "monotone", ok))
        best = max(self.throughput.values()) if self.throughput else None
        r = ratio(best, self.commit_rate.get(4))
        out.append(("end to end / commit rate with notify trigger (4 producers)", r, ">= 0.5", met(r, 0.5)))
        for rate, lat in self.latency.items():
            limit = 50.0 if rate == 100.0 else 100.0
            if rate == 100.0:
                out.append(("p50 ms at 100 events/s", lat["p50"], "<= 10", lat["p50"] <= 10))
            out.append((f"p99 ms at {rate:.0f} events/s", lat["p99"], f"<= {limit:.0f}", lat["p99"] <= limit))
        drain = self.backlog.get("drain_events_per_s")
        r = ratio(drain, self.backlog_per_row.get("drain_events_per_s"))
        out.append(("backlog drain / one-row-per-job drain", r, ">= 3", met(r, 3.0)))
        for key, value in self.idle_cpu.items():
            limit = 1.0 if key == "relay" else 2.0
            out.append((f"idle CPU % of a core, {key}", value, f"<= {limit:.0f}", value <= limit))
        return out

    def as_json(self) -> dict[str, Any]:
        """The results as written by ``--json``."""
        w = self.workers
        ratio = self.throughput.get(w, 0.0) / self.ceiling[w] if self.ceiling.get(w) else None
        return {
            "machine": self.machine,
            "durable": self.durable,
            "job_batch_size": self.job_batch_size,
            "accounts": self.accounts,
            "workers": w,
            "arq_noop_ceiling_jobs_per_s": self.ceiling.get(w),
            "throughput_events_per_s": self.throughput.get(w),
            "ratio_to_arq_ceiling": ratio,
            "commit_rate_with_notify_trigger_per_s": {str(k): v for k, v in self.commit_rate.items()},
            "idle_cpu_percent_of_a_core": self.idle_cpu,
            "backlog_one_row_per_job": self.backlog_per_row,
            "targets": [{"measure": m, "value": v, "target": t, "met": ok} for m, v, t, ok in self.targets()],
            "sink_targets": [
                {"measure": m, "value": v, "target": t, "met": ok} for m, v, t, ok in self.sink_targets()
            ],
            "latency_ms": {str(int(rate)): v for rate, v in self.latency.items()},
            "backlog": self.backlog,
            "table_scale": self.table,
            "scaling": {
                str(n): {
                    "ceiling_jobs_per_s": self.ceiling.get(n),
                    "events_per_s": self.throughput.get(n),
                    "ratio": (self.throughput[n] / self.ceiling[n])
                    if self.ceiling.get(n) and n in self.throughput
                    else None,
                    "cpu_seconds_per_1000_events": self.cpu_by_workers.get(n, {}),
                    "ceiling_rounds": self.ceiling_runs.get(n, []),
                    "events_per_s_rounds": self.throughput_runs.get(n, []),
                    "drain_events_per_s": statistics.median(self.drain_runs[n])
                    if self.drain_runs.get(n)
                    else None,
                    "drain_rounds": self.drain_runs.get(n, []),
                    "drain_cores_busy_rounds": self.drain_cores_busy.get(n, []),
                }
                for n in sorted(set(self.ceiling) | set(self.throughput))
            },
            "cpu_seconds_per_1000_events": self.cpu_per_1000,
            **self.sinks_json(),
        }

    def reservation_path(self) -> dict[str, float | None]:
        """The reference of the sink routes: the reservation path's events/s with the same workers,
        and its relay's and workers' CPU seconds per 1,000 events."""
        cpu = self.cpu_per_1000
        relay, workers = cpu.get("relay"), cpu.get("workers")
        return {
            "events_per_s": self.throughput.get(self.workers),
            "cpu_relay_and_workers_per_1000_events": relay + workers
            if relay is not None and workers is not None
            else None,
        }

    def sinks_json(self) -> dict[str, Any]:
        """``sinks`` (each with its ratio to the reservation path), ``webhook_50ms``, the reference."""
        reference = self.reservation_path()["events_per_s"]
        sinks = {}
        for name, route in self.sinks.items():
            rate = route.get("events_per_s")
            ratio = rate / reference if rate and reference else None
            sinks[name] = {**route, "ratio_to_reservation_path": ratio} if "skipped" not in route else route
        rates = {str(n): r.get("events_per_s") for n, r in sorted(self.webhook_50ms.items())}
        one, two = rates.get("1"), rates.get("2")
        steady = [r.get("events_per_s_first_to_last_finished") for _, r in sorted(self.webhook_50ms.items())]
        return {
            "sinks": sinks,
            "sinks_reference": self.reservation_path(),
            "webhook_50ms": {
                "workers": rates,
                "ratio_2_to_1": two / one if one and two else None,
                # the same without the fixed start (replication, the relay's first pass): first to
                # last finished
                "ratio_2_to_1_first_to_last_finished": steady[1] / steady[0]
                if len(steady) == 2 and steady[0] and steady[1]
                else None,
                "runs": {str(n): r for n, r in sorted(self.webhook_50ms.items())},
            },
        }

    def sink_targets(self) -> list[tuple[str, float | None, str, bool | None]]:
        """(measure, value, target, met) for each sink target of issue 16."""
        data = self.sinks_json()
        out: list[tuple[str, float | None, str, bool | None]] = []
        for name, least in (("nats", 0.8), ("kafka", 0.8), ("rabbitmq", 0.5), ("webhook", 0.5)):
            if name in data["sinks"]:
                r = data["sinks"][name].get("ratio_to_reservation_path")
                out.append((f"{name} / reservation path", r, f">= {least}", met(r, least)))
        r = data["webhook_50ms"]["ratio_2_to_1"]
        if self.webhook_50ms:
            out.append(("webhook at 50 ms, 2 workers / 1 worker", r, ">= 1.8", met(r, 1.8)))
        runs = [r for r in [*self.sinks.values(), *self.webhook_50ms.values()] if "skipped" not in r]
        if runs:
            longest = max(r["longest_idle_in_transaction_s"] for r in runs)
            out.append(("longest idle in transaction, any sink run (s)", longest, "<= 1", longest <= 1.0))
            once = all(r["delivered"] == r["events"] and not r["failed_rows"] for r in runs)
            out.append(("every event delivered once, none failed", None, "all", once))
        return out


def met(value: float | None, at_least: float) -> bool | None:
    """Whether ``value`` reaches ``at_least`` (None: not measured)."""
    return None if value is None else value >= at_least
