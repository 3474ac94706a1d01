"""Health semantics: heartbeats with deadlines, waiting on a server, readiness, and the HTTP endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp
import pytest

from outbox_relay.observability import Health, Metrics
from outbox_relay.observability.hooks import OTHER_KIND, RelayHooks, WorkerHooks
from outbox_relay.observability.http import ObservabilityServer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_that_beats_within_its_deadline_is_alive() -> None:
    """Beating resets the deadline: a loop beating every 4 s with a 5 s deadline stays healthy."""
    clock = Clock()
    health = Health(clock=clock)
    health.register("relay", 5.0)
    for _ in range(10):
        clock.now += 4.0
        health.beat("relay")
        assert health.liveness().ok
    assert health.liveness().loops["relay"]["alive"] is True


def test_a_loop_silent_past_its_deadline_is_stuck() -> None:
    """One loop that stops beating makes liveness fail and is named; others stay alive."""
    clock = Clock()
    health = Health(clock=clock)
    health.register("relay", 5.0)
    health.register("other", 60.0)
    clock.now += 5.5
    live = health.liveness()
    assert not live.ok
    assert live.stuck == ["relay"]
    assert live.loops["other"]["alive"] is True


def test_a_loop_waiting_on_a_server_is_alive_however_long() -> None:
    """Inside waiting(), a loop is alive past its deadline (readiness, not liveness); leaving beats."""
    clock = Clock()
    health = Health(clock=clock)
    health.register("relay", 5.0)
    with health.waiting("relay", "Redis"):
        clock.now += 600.0
        live = health.liveness()
        assert live.ok
        assert live.loops["relay"]["waiting_on"] == "Redis"
    assert health.liveness().ok  # leaving the block counted as a beat
    clock.now += 6.0
    assert not health.liveness().ok


def test_beat_registers_with_a_deadline_and_refuses_unknown_names_without_one() -> None:
    """beat() of an unknown loop needs a deadline; a bad deadline is refused."""
    health = Health()
    with pytest.raises(KeyError):
        health.beat("nope")
    health.beat("new", deadline=1.0)
    assert "new" in health.liveness().loops
    with pytest.raises(ValueError, match="deadline"):
        health.register("bad", 0)


def test_unregistered_loop_is_no_longer_watched() -> None:
    """A loop that ended on purpose is removed and cannot make the process unhealthy."""
    clock = Clock()
    health = Health(clock=clock)
    health.register("relay.active", 1.0)
    health.unregister("relay.active")
    clock.now += 10
    assert health.liveness().ok


def test_readiness_carries_reasons_only_while_not_ready_and_keeps_the_role() -> None:
    """set_ready: reasons while not ready, none once ready; role kept when not given."""
    health = Health()
    assert not health.readiness().ready  # starting
    health.set_ready(False, reasons=["Redis unreachable"], role="standby")
    expected = {"ready": False, "role": "standby", "reasons": ["Redis unreachable"]}
    assert health.readiness().as_json() == expected
    health.set_ready(True)
    assert health.readiness().as_json() == {"ready": True, "role": "standby"}
    health.set_ready(True, role="active")
    assert health.readiness().role == "active"


def test_worker_kind_labels_are_bounded() -> None:
    """A kind no handler is registered for is labelled 'other': producers cannot grow the label set."""
    hooks = WorkerHooks(kinds=["reservation"])
    assert hooks.label("reservation") == "reservation"
    assert hooks.label("x" * 500) == OTHER_KIND
    assert hooks.label(None) == OTHER_KIND


def test_two_metrics_objects_do_not_clash() -> None:
    """Each Metrics has its own registry: two in one process register the same names without error."""
    first, second = Metrics("relay"), Metrics("relay")
    first.relay_active.set(1)
    assert b"outbox_relay_relay_active 1.0" in first.exposition()
    assert b"outbox_relay_relay_active 0.0" in second.exposition()


async def test_healthz_turns_503_when_a_loop_stops_beating() -> None:
    """Over HTTP: 200 while the loop beats, 503 naming it once it misses a short deadline."""
    health = Health()
    health.register("relay", 0.3)
    health.set_ready(True, role="active")
    async with (
        ObservabilityServer(health, Metrics("relay"), host="127.0.0.1", port=0) as server,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{server.port}"
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{base}/readyz") as response:
            assert response.status == 200
            assert await response.json() == {"ready": True, "role": "active"}
        await asyncio.sleep(0.5)  # the point of this test: a loop that does NOT beat for longer than 0.3 s
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 503
            assert (await response.json())["stuck"] == ["relay"]
        health.beat("relay")
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
        health.set_ready(False, reasons=["the service database unreachable; retrying"])
        async with http.get(f"{base}/readyz") as response:
            assert response.status == 503
            body = await response.json()
            assert body["ready"] is False
            assert body["reasons"] == ["the service database unreachable; retrying"]
        async with http.get(f"{base}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
            assert 'outbox_relay_rows{status="new"} 0.0' in text
            assert 'outbox_relay_handed_over_total{path="notify"} 0.0' in text


def _exposed(metrics: Metrics) -> set[str]:
    return {family.name for family in metrics.registry.collect()}


def test_each_role_exposes_only_its_own_metrics() -> None:
    """A relay's registry holds the relay metrics only, a worker's the worker ones; together: the table."""
    from outbox_relay.observability.metrics import METRICS

    relay, worker = _exposed(Metrics("relay")), _exposed(Metrics("worker"))
    assert not relay & worker
    assert {"outbox_relay_rows", "outbox_relay_relay_active", "outbox_relay_handed_over"} <= relay
    assert {"outbox_relay_events", "outbox_relay_commit_to_finish_seconds"} <= worker
    assert "outbox_relay_worker_jobs_in_flight" not in relay
    assert relay | worker == {spec.name for spec in METRICS}


def test_the_other_roles_metric_fails_loudly() -> None:
    """Asking a relay's Metrics for a worker metric raises, naming the metric and its role."""
    with pytest.raises(AttributeError, match="outbox_relay_events is a worker metric"):
        Metrics("relay").events  # noqa: B018
    with pytest.raises(AttributeError, match="outbox_relay_relay_active is a relay metric"):
        Metrics("worker").relay_active  # noqa: B018
    with pytest.raises(ValueError, match="needs the worker's metrics"):
        WorkerHooks(metrics=Metrics("relay"))


def test_the_hooks_of_a_role_touch_only_its_metrics() -> None:
    """Every RelayHooks call runs on a relay's Metrics (a worker metric would raise there)."""
    relay = RelayHooks(Health(), Metrics("relay"))
    relay.standby()
    relay.active()
    relay.handed_over("notify", 3)
    relay.swept_unnotified(1)
    relay.queue_depth(2)
    relay.session_ended("lost")
    relay.inactive()
    assert b"outbox_relay_listener_reconnects_total 1.0" in relay.metrics.exposition()  # type: ignore[union-attr]


async def test_the_worker_hooks_count_outcomes_on_a_workers_metrics() -> None:
    """WorkerHooks.instrument counts each row's outcome on a worker's Metrics (no relay metric touched)."""
    from outbox_relay.queue import Job, Outcome

    hooks = WorkerHooks(Health(), Metrics("worker"), kinds=["reservation"])
    hooks.ready()
    hooks.not_ready("database away")

    async def apply(jobs: Sequence[Job]) -> list[Outcome]:
        return [Outcome("finished", kind="reservation", commit_to_finish=0.1), Outcome.retry(1.0, "x")]

    await hooks.instrument(apply)([Job(1), Job(2)])
    text = hooks.metrics.exposition()  # type: ignore[union-attr]
    assert b'outbox_relay_events_total{kind="reservation",result="finished"} 1.0' in text
    assert b'outbox_relay_retries_total{kind="other"} 1.0' in text


def test_worker_up_follows_liveness_and_readiness() -> None:
    """outbox_relay_worker_up is 0 until the worker is ready, 1 then, 0 again when its loop is stuck or it
    loses a server: what /healthz and /readyz say, as a gauge the alert rules can read."""
    clock = Clock()
    hooks = WorkerHooks(Health(clock=clock), Metrics("worker"), deadline=5.0)
    metrics = hooks.metrics
    assert metrics is not None

    def up() -> bytes:
        return next(
            line for line in metrics.exposition().splitlines() if line.startswith(b"outbox_relay_worker_up")
        )

    assert up() == b"outbox_relay_worker_up 0.0"
    hooks.ready()
    assert up() == b"outbox_relay_worker_up 1.0"
    clock.now += 6.0  # no beat within the deadline: stuck
    assert up() == b"outbox_relay_worker_up 0.0"
    hooks.beat()
    hooks.not_ready("Redis unreachable")
    assert up() == b"outbox_relay_worker_up 0.0"


def test_a_worker_shows_every_outcome_of_each_kind_at_zero_from_the_start() -> None:
    """Each registered kind (and `other`) has its finished/failed/retried counters at 0 before any row:
    the first failure is an increase Prometheus sees (a series born at 1 shows none)."""
    text = WorkerHooks(Health(), Metrics("worker"), kinds=["reservation"]).metrics.exposition()  # type: ignore[union-attr]
    for kind in ("reservation", OTHER_KIND):
        for result in ("finished", "failed", "retried"):
            assert f'outbox_relay_events_total{{kind="{kind}",result="{result}"}} 0.0'.encode() in text
