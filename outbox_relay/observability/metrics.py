"""The Prometheus metrics of outbox_relay (contract section 6, plus what an operator expects).

Every metric lives on a registry of its own (never prometheus-client's global
one), so that tests, or a relay and a worker sharing one process, do not clash.
No label ever carries a correlation id, a job id or any other unbounded value:
``kind`` is bounded by the registered handlers, the rest are fixed sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Buckets (seconds) for commit→finished: the fast path is milliseconds, a retried row minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
#: Buckets (seconds) for one handler attempt (JOB_TIMEOUT is 10 s by default).
HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

PENDING_STATUSES = ("new", "queued", "failed")
HAND_OVER_PATHS = ("notify", "sweep")
EVENT_RESULTS = ("finished", "failed", "retried")

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """All metrics of one process, on a dedicated :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # -- contract section 6 ---------------------------------------------------
        self.rows = Gauge(
            "outbox_relay_rows", "Rows in each pending or failed status (relay)", ["status"], registry=r
        )
        self.oldest_pending_age = Gauge(
            "outbox_relay_oldest_pending_age_seconds",
            "Age of the oldest new or queued row, from its created_at; 0 when none (relay)",
            registry=r,
        )
        self.relay_active = Gauge(
            "outbox_relay_relay_active", "1 on the active relay, 0 on a standby", registry=r
        )
        self.handed_over = Counter(
            "outbox_relay_handed_over",
            "Rows handed to the queue, by how the relay found them",
            ["path"],
            registry=r,
        )
        self.events = Counter(
            "outbox_relay_events", "Handler outcomes (worker)", ["kind", "result"], registry=r
        )
        self.commit_to_finish = Histogram(
            "outbox_relay_commit_to_finish_seconds",
            "From a row's created_at to its finished_at (worker)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # -- the extras ---------------------------------------------------
        self.listener_reconnects = Counter(
            "outbox_relay_listener_reconnects",
            "Relay sessions that ended and reconnected (listener connection lost or failed)",
            registry=r,
        )
        self.sweep_missed_notify = Counter(
            "outbox_relay_sweep_found_unnotified_rows",
            "New rows the sweep found that no notification had delivered (the fast path's health)",
            registry=r,
        )
        self.queue_depth = Gauge(
            "outbox_relay_queue_depth", "Jobs in the arq queue, as the relay last saw it", registry=r
        )
        self.replication_lag_seconds = Gauge(
            "outbox_relay_replication_lag_seconds",
            "Seconds since the subscription last heard from the primary (pg_stat_subscription)",
            registry=r,
        )
        self.replication_lag_bytes = Gauge(
            "outbox_relay_replication_lag_bytes",
            "WAL bytes the subscription's slot has not confirmed (needs PRIMARY_URL)",
            registry=r,
        )
        self.subscription_enabled = Gauge(
            "outbox_relay_subscription_enabled",
            "1 when the subscription exists and is enabled, 0 otherwise (replicated shape)",
            registry=r,
        )
        self.subscription_apply_errors = Gauge(
            "outbox_relay_subscription_apply_errors",
            "Apply errors of the subscription (pg_stat_subscription_stats.apply_error_count)",
            registry=r,
        )
        self.subscription_sync_errors = Gauge(
            "outbox_relay_subscription_sync_errors",
            "Initial sync errors of the subscription (pg_stat_subscription_stats.sync_error_count)",
            registry=r,
        )
        self.refresh_errors = Counter(
            "outbox_relay_gauge_refresh_errors",
            "Failed refreshes of the database-backed gauges (relay)",
            registry=r,
        )
        self.jobs_in_flight = Gauge(
            "outbox_relay_worker_jobs_in_flight", "Jobs this worker is running now", registry=r
        )
        self.handler_duration = Histogram(
            "outbox_relay_handler_duration_seconds",
            "Duration of one handler attempt, whatever its outcome (worker)",
            ["kind"],
            buckets=HANDLER_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "outbox_relay_retries",
            "Transient failures scheduled for another attempt (worker)",
            ["kind"],
            registry=r,
        )
        # Known label values appear at 0 from the start, so that rate() and alerts see them.
        for status in PENDING_STATUSES:
            self.rows.labels(status=status)
        for path in HAND_OVER_PATHS:
            self.handed_over.labels(path=path)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
