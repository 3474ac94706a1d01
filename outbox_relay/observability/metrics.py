"""The Prometheus metrics of outbox_relay (contract section 6, plus what an operator expects).

The metrics are declared as data (:data:`METRICS`: name, type, help, labels,
role) and built from that table. Each process exposes only its role's
metrics: a relay has no handler outcomes, a worker no rows or leadership
(``Metrics(role="relay")`` / ``Metrics(role="worker")``); asking a process's
:class:`Metrics` for the other role's metric raises :class:`AttributeError`.

Every metric lives on a registry of its own (never prometheus-client's global
one), so that tests, or a relay and a worker sharing one process, do not clash.
No label ever carries a correlation id, a job id or any other unbounded value:
``kind`` is bounded by the registered handlers, the rest are fixed sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Buckets (seconds) for commit→finished: the fast path is milliseconds, a retried row minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
#: Buckets (seconds) for one handler attempt (JOB_TIMEOUT is 10 s by default).
HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

PENDING_STATUSES = ("new", "queued", "failed")
HAND_OVER_PATHS = ("notify", "sweep")
EVENT_RESULTS = ("finished", "failed", "retried")
#: Why the relay dropped a notification (relay/dispatcher.py): a payload naming no row, or a row id
#: arriving while the relay holds as many notified ids as it keeps (the sweep finds those rows).
NOTIFICATION_DROP_REASONS = ("not_a_row_id", "pending_full")

#: The process a :class:`Metrics` belongs to.
Role = Literal["relay", "worker"]

__all__ = ["CONTENT_TYPE_LATEST", "METRICS", "MetricSpec", "Metrics", "Role"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: the :class:`Metrics` attribute, its exposed name, type, help, labels and role."""

    attr: str
    name: str
    type: Literal["counter", "gauge", "histogram"]
    help: str
    role: Role
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    #: Label values shown at 0 from the start, so that rate() and alerts see them.
    known: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def build(self, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
        if self.type == "histogram":
            return Histogram(self.name, self.help, self.labels, buckets=self.buckets, registry=registry)
        kind = Counter if self.type == "counter" else Gauge
        metric = kind(self.name, self.help, self.labels, registry=registry)
        for label, values in self.known.items():
            for value in values:
                metric.labels(**{label: value})
        return metric


# fmt: off
METRICS: tuple[MetricSpec, ...] = (
    # -- contract section 6 ---------------------------------------------------
    MetricSpec("rows", "outbox_relay_rows", "gauge",
               "Rows in each pending or failed status (relay)", "relay", ("status",),
               known={"status": PENDING_STATUSES}),
    MetricSpec("oldest_pending_age", "outbox_relay_oldest_pending_age_seconds", "gauge",
               "Age of the oldest new or queued row, from its created_at; 0 when none (relay)", "relay"),
    MetricSpec("relay_active", "outbox_relay_relay_active", "gauge",
               "1 on the active relay, 0 on a standby", "relay"),
    MetricSpec("handed_over", "outbox_relay_handed_over", "counter",
               "Rows handed to the queue, by how the relay found them", "relay", ("path",),
               known={"path": HAND_OVER_PATHS}),
    MetricSpec("events", "outbox_relay_events", "counter",
               "Handler outcomes (worker)", "worker", ("kind", "result")),
    MetricSpec("commit_to_finish", "outbox_relay_commit_to_finish_seconds", "histogram",
               "From a row's created_at to its finished_at (worker)", "worker", ("kind",),
               buckets=LATENCY_BUCKETS),
    # -- the extras ---------------------------------------------------
    MetricSpec("listener_reconnects", "outbox_relay_listener_reconnects", "counter",
               "Relay sessions that ended and reconnected (listener connection lost or failed)", "relay"),
    MetricSpec("sweep_missed_notify", "outbox_relay_sweep_found_unnotified_rows", "counter",
               "New rows the sweep found that no notification had delivered (the fast path's health)",
               "relay"),
    MetricSpec("notifications_dropped", "outbox_relay_notifications_dropped", "counter",
               "Notifications the relay dropped: no row id (forged or foreign), or too many ids waiting",
               "relay", ("reason",), known={"reason": NOTIFICATION_DROP_REASONS}),
    MetricSpec("listener_resets", "outbox_relay_listener_resets", "counter",
               "Times the relay's notification listener fell behind (a flood) and was replaced, its "
               "backlog dropped (the sweep hands those rows over)", "relay"),
    MetricSpec("queue_depth", "outbox_relay_queue_depth", "gauge",
               "Jobs in the arq queue, as the relay last saw it", "relay"),
    MetricSpec("replication_lag_seconds", "outbox_relay_replication_lag_seconds", "gauge",
               "Seconds since the subscription last heard from the primary (pg_stat_subscription)", "relay"),
    MetricSpec("replication_lag_bytes", "outbox_relay_replication_lag_bytes", "gauge",
               "WAL bytes the subscription's slot has not confirmed (needs PRIMARY_URL)", "relay"),
    # The subscription's gauges exist only where one does: on the active relay, once it found the
    # service database's subscription (none in the direct shape, none on a standby).
    MetricSpec("subscription_enabled", "outbox_relay_subscription_enabled", "gauge",
               "1 when the subscription is enabled, 0 when disabled (active relay, replicated shape only)",
               "relay", ("subscription",)),
    MetricSpec("subscription_apply_errors", "outbox_relay_subscription_apply_errors", "gauge",
               "Apply errors of the subscription (pg_stat_subscription_stats.apply_error_count)", "relay",
               ("subscription",)),
    MetricSpec("subscription_sync_errors", "outbox_relay_subscription_sync_errors", "gauge",
               "Initial sync errors of the subscription (pg_stat_subscription_stats.sync_error_count)",
               "relay", ("subscription",)),
    MetricSpec("refresh_errors", "outbox_relay_gauge_refresh_errors", "counter",
               "Failed refreshes of the database-backed gauges (relay)", "relay"),
    MetricSpec("worker_up", "outbox_relay_worker_up", "gauge",
               "1 while this worker is live and ready (as /healthz and /readyz say), 0 otherwise",
               "worker"),
    MetricSpec("jobs_in_flight", "outbox_relay_worker_jobs_in_flight", "gauge",
               "Jobs this worker is running now", "worker"),
    MetricSpec("handler_duration", "outbox_relay_handler_duration_seconds", "histogram",
               "Duration of one handler attempt, whatever its outcome (worker)", "worker", ("kind",),
               buckets=HANDLER_BUCKETS),
    MetricSpec("retries", "outbox_relay_retries", "counter",
               "Transient failures scheduled for another attempt (worker)", "worker", ("kind",)),
    MetricSpec("foreign_jobs", "outbox_relay_worker_foreign_jobs", "counter",
               "Jobs of another service database this worker refused and put back (two services "
               "share a queue name)", "worker"),
)
# fmt: on
_BY_ATTR = {spec.attr: spec for spec in METRICS}


class Metrics:
    """The metrics of one process's ``role``, built from :data:`METRICS` on a dedicated registry."""

    # relay
    rows: Gauge
    oldest_pending_age: Gauge
    relay_active: Gauge
    handed_over: Counter
    listener_reconnects: Counter
    sweep_missed_notify: Counter
    notifications_dropped: Counter
    listener_resets: Counter
    queue_depth: Gauge
    replication_lag_seconds: Gauge
    replication_lag_bytes: Gauge
    subscription_enabled: Gauge
    subscription_apply_errors: Gauge
    subscription_sync_errors: Gauge
    refresh_errors: Counter
    # worker
    worker_up: Gauge
    events: Counter
    commit_to_finish: Histogram
    jobs_in_flight: Gauge
    handler_duration: Histogram
    retries: Counter
    foreign_jobs: Counter

    def __init__(self, role: Role) -> None:
        self.role: Role = role
        self.registry = CollectorRegistry(auto_describe=True)
        for spec in METRICS:
            if spec.role == role:
                setattr(self, spec.attr, spec.build(self.registry))

    if not TYPE_CHECKING:  # for mypy every metric is declared above; at run time only the role's exist

        def __getattr__(self, attr: str) -> object:
            spec = _BY_ATTR.get(attr)
            if spec is None:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")
            role = self.__dict__.get("role")
            raise AttributeError(f"{spec.name} is a {spec.role} metric: the {role}'s metrics do not have it")

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
