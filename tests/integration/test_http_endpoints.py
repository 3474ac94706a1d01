"""`run` and `worker` with OUTBOX_RELAY_HTTP_PORT: /healthz, /readyz and /metrics of real processes."""

from __future__ import annotations

import re

from outbox_relay.devtools.embedded import free_port
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env, connect, http_get, open_account, produce, reserve

#: The contract's metrics, by the process that exposes them (each process only its role's).
RELAY_METRICS = (
    "outbox_relay_rows",
    "outbox_relay_oldest_pending_age_seconds",
    "outbox_relay_relay_active",
    "outbox_relay_handed_over_total",
)
WORKER_METRICS = ("outbox_relay_events_total", "outbox_relay_commit_to_finish_seconds")
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def samples(text: str) -> dict[tuple[str, str], float]:
    """(metric name, label text) -> value, from a text exposition."""
    found: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            found[(match["name"], match["labels"] or "")] = float(match["value"])
    return found


def total(text: str, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        value
        for (metric, label_text), value in samples(text).items()
        if metric == name and all(w in label_text.split(",") for w in wanted)
    )


async def test_relays_and_worker_serve_health_readiness_and_metrics(
    outbox_env: OutboxEnv, services: Services
) -> None:
    """Two relays: one says active, the other standby on /readyz; /healthz is 200 on all three
    processes; /metrics carries the contract's names, each process its role's only, and the counters
    and gauges move as rows flow."""
    ports = {"relay-a": free_port(), "relay-b": free_port(), "worker": free_port()}
    for name, port in ports.items():
        command = "worker" if name == "worker" else "run"
        env = cli_env(outbox_env.env(HTTP_PORT=str(port), SWEEP_INTERVAL="1"))
        services.start(name, command, env=env)

    async def roles() -> dict[str, str] | None:
        found = {}
        for name in ("relay-a", "relay-b"):
            status, body = await http_get(ports[name], "/readyz")
            if status != 200:
                return None
            found[name] = body["role"]
        return found if sorted(found.values()) == ["active", "standby"] else None

    found = await services.wait(roles, timeout=60, message="one active and one standby relay on /readyz")
    active = next(name for name, role in found.items() if role == "active")
    standby = next(name for name, role in found.items() if role == "standby")

    async def worker_ready() -> bool:
        status, body = await http_get(ports["worker"], "/readyz")
        return status == 200 and body == {"ready": True, "role": "worker"}

    await services.wait(worker_ready, timeout=60, message="the worker ready on /readyz")
    for name, port in ports.items():
        status, body = await http_get(port, "/healthz")
        assert status == 200, (name, body)
        assert body["ok"] is True

    _, before = await http_get(ports[active], "/metrics")
    _, worker_before = await http_get(ports["worker"], "/metrics")
    for metric in RELAY_METRICS:
        assert f"# TYPE {metric.removesuffix('_total')}" in before, metric
        assert f"# TYPE {metric.removesuffix('_total')}" not in worker_before, metric
    for metric in WORKER_METRICS:
        assert f"# TYPE {metric.removesuffix('_total')}" in worker_before, metric
        assert f"# TYPE {metric.removesuffix('_total')}" not in before, metric
    assert "outbox_relay_worker_jobs_in_flight" not in before
    assert "outbox_relay_queue_depth" not in worker_before
    assert total(before, "outbox_relay_relay_active") == 1
    _, standby_metrics = await http_get(ports[standby], "/metrics")
    assert total(standby_metrics, "outbox_relay_relay_active") == 0

    conn = await connect(outbox_env.service_url)
    try:
        await open_account(conn, "acct", 10_000)
        for i in range(20):
            await reserve(conn, "acct", 10, f"http-{i}")
            await produce(conn, f"http-{i}", "success")
        await produce(conn, "http-poison", "success")  # no reservation: a permanent failure

        async def flowed() -> bool:
            _, relay_text = await http_get(ports[active], "/metrics")
            _, worker_text = await http_get(ports["worker"], "/metrics")
            events, latency = "outbox_relay_events_total", "outbox_relay_commit_to_finish_seconds_count"
            return (
                relay_text is not None
                and worker_text is not None
                and total(relay_text, "outbox_relay_handed_over_total") >= 21
                and total(worker_text, events, kind="reservation", result="finished") >= 20
                and total(worker_text, events, kind="reservation", result="failed") >= 1
                and total(worker_text, latency, kind="reservation") >= 20
                # the relay's interval refresh (every 5 s) sees the failed row
                and total(relay_text, "outbox_relay_rows", status="failed") == 1
            )

        await services.wait(flowed, timeout=60, message="handed-over, event and row metrics to move")
        _, relay_text = await http_get(ports[active], "/metrics")
        assert total(relay_text, "outbox_relay_rows", status="new") == 0
        assert total(relay_text, "outbox_relay_oldest_pending_age_seconds") == 0
        _, worker_text = await http_get(ports["worker"], "/metrics")
        assert total(worker_text, "outbox_relay_handler_duration_seconds_count", kind="reservation") >= 21
        assert total(worker_text, "outbox_relay_worker_jobs_in_flight") == 0
        # No correlation id ever becomes a label.
        assert "http-" not in relay_text
        assert "http-" not in worker_text
    finally:
        await conn.close()


async def test_a_standby_turns_active_on_readyz_when_the_active_relay_stops(
    outbox_env: OutboxEnv, services: Services
) -> None:
    """/readyz follows leadership: stopping the active relay makes the standby report active."""
    ports = [free_port(), free_port()]
    relays = [
        services.start(f"relay-{i}", "run", env=cli_env(outbox_env.env(HTTP_PORT=str(port))))
        for i, port in enumerate(ports)
    ]

    async def role_of(port: int) -> str | None:
        status, body = await http_get(port, "/readyz")
        return body.get("role") if status == 200 else None

    async def split() -> list[str | None] | None:
        found = [await role_of(port) for port in ports]
        return found if sorted(r or "" for r in found) == ["active", "standby"] else None

    found = await services.wait(split, timeout=60, message="one active and one standby relay")
    active = found.index("active")
    other = 1 - active
    relays[active].proc.terminate()
    await services.wait_exit(relays[active], timeout=30)

    async def took_over() -> bool:
        return await role_of(ports[other]) == "active"

    await services.wait(took_over, timeout=30, message="the standby to report active")
    _, text = await http_get(ports[other], "/metrics")
    assert total(text, "outbox_relay_relay_active") == 1


def test_a_bad_http_port_is_a_settings_error(outbox_env: OutboxEnv) -> None:
    """OUTBOX_RELAY_HTTP_PORT outside 1-65535 exits 2 with one line naming the variable."""
    from tests.helpers import run_cli

    result = run_cli("run", env=cli_env(outbox_env.env(HTTP_PORT="70000")), timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("outbox-relay: invalid setting OUTBOX_RELAY_HTTP_PORT")
    assert len(result.stderr.strip().splitlines()) == 1
