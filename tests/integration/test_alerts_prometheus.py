"""deploy/prometheus/alerts.yml in a real Prometheus scraping real relay and worker processes.

A ``prometheus`` server (Debian's package, as promtool: tests/tools.py) scrapes
``run`` and ``worker`` started through the CLI, of both shapes, under scrape
jobs with arbitrary names (every 1 s, rules evaluated every 1 s). Healthy, no
alert is pending or firing; broken, each alert fires. The test's copy of the
rules has every ``for:`` cut to 1 s (:func:`rules_copy`): the expressions are the
shipped ones, only the waits before firing are shorter.
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from outbox_relay.devtools.embedded import free_port
from tests.conftest import OutboxEnv
from tests.helpers import (
    Service,
    Services,
    count_status,
    equals,
    http_get,
    open_account,
    produce,
    reserve,
    run_cli,
    wait_until,
)
from tests.tools import NO_PROMTOOL, ToolMissing, prometheus, promtool_opted_out

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
#: Seconds an alert may take to fire once its cause is there (the relay refreshes its gauges every 5 s).
FIRE_TIMEOUT = 30.0


def rules_copy(target: Path) -> Path:
    """alerts.yml with every ``for:`` cut to 1 s, written to ``target``."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    return target


class Prometheus:
    """One ``prometheus`` server on a free loopback port, scraping ``jobs`` (scrape job -> services)."""

    def __init__(self, directory: Path, jobs: Mapping[str, list[Service]]) -> None:
        self.port = free_port()
        self.log = directory / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules_copy(directory / "alerts.yml"))],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{s.port}" for s in services]}]}
                for job, services in jobs.items()
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.args = [
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        try:
            binary = prometheus()
        except ToolMissing as exc:
            if promtool_opted_out():
                pytest.xfail(f"{NO_PROMTOOL}=1: {exc}")
            pytest.fail(str(exc))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(binary), *self.args], stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def api(self, path: str) -> Any:
        """The ``data`` of GET /api/v1/``path``; None while the server does not answer."""
        status, body = await http_get(self.port, f"/api/v1/{path}")
        return body["data"] if status == 200 and isinstance(body, dict) else None

    async def query(self, expr: str) -> dict[str, str]:
        """instance -> value of each series ``expr`` returns now."""
        data = await self.api(f"query?query={urllib.parse.quote(expr)}")
        return {r["metric"].get("instance", ""): r["value"][1] for r in (data or {}).get("result", [])}

    async def alerts(self) -> dict[str, str]:
        """alertname -> state (``pending`` / ``firing``) of every active alert."""
        data = await self.api("alerts")
        return {a["labels"]["alertname"]: a["state"] for a in (data or {}).get("alerts", [])}

    async def evaluations(self) -> str:
        """The rule group's last evaluation time (changes at each evaluation)."""
        data = await self.api("rules")
        return str(data["groups"][0].get("lastEvaluation", "")) if data and data["groups"] else ""

    async def settled(self, services: Services, *, up: int, evaluations: int = 3) -> dict[str, str]:
        """Wait until ``up`` targets answer scrapes, then ``evaluations`` more rule evaluations; the
        active alerts then."""

        async def all_up() -> bool:
            data = await self.api("targets")
            return len([t for t in (data or {}).get("activeTargets", []) if t["health"] == "up"]) == up

        await services.wait(all_up, timeout=30, message=f"Prometheus to scrape {up} targets")
        seen = {await self.evaluations()}

        async def evaluated() -> bool:
            seen.add(await self.evaluations())
            return len(seen) > evaluations

        await services.wait(evaluated, timeout=30, message=f"{evaluations} rule evaluations")
        return await self.alerts()

    async def firing(self, services: Services, alert: str) -> dict[str, str]:
        """Wait until ``alert`` fires; every active alert then."""

        async def fired() -> dict[str, str] | None:
            alerts = await self.alerts()
            return alerts if alerts.get(alert) == "firing" else None

        try:
            result: dict[str, str] = await services.wait(
                fired, timeout=FIRE_TIMEOUT, message=f"{alert} to fire"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nactive alerts: {await self.alerts()}\n{self.tail()}") from None
        return result

    def tail(self) -> str:
        """The end of Prometheus' log."""
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Path:
    """A directory of its own for Prometheus' configuration, rules copy, storage and log."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    return directory


async def _finish_some_rows(service_conn: Any, producer: Any, prefix: str) -> None:
    """Reserve and produce three rows on ``producer`` (the service database or the primary); wait
    until the worker finished them."""
    await open_account(service_conn, f"{prefix}-acc", 1_000)
    for i in range(3):
        await reserve(service_conn, f"{prefix}-acc", 10, f"{prefix}-{i}")
        await produce(producer, f"{prefix}-{i}", "success")
    await wait_until(
        lambda: equals(count_status(service_conn, "finished"), 3), timeout=20, message="3 rows finished"
    )


async def _kill(service: Service) -> None:
    service.proc.kill()
    await asyncio.to_thread(service.proc.wait, 10)


async def test_direct_shape_quiet_when_healthy_and_each_alert_fires_when_broken(
    outbox_env: OutboxEnv, service: Any, services: Services, prometheus_dir: Path
) -> None:
    """Direct shape (no subscription), jobs named at will: healthy, no alert at all (not even pending);
    then a row of no known kind -> failed rows increasing; the worker killed -> no live worker; an old
    row waiting -> pending rows old; the relay killed -> no active relay."""
    env = outbox_env.env(PRIMARY_URL="")
    env.pop("OUTBOX_RELAY_PRIMARY_URL")
    relay, worker = await services.start_fleet(env)
    await _finish_some_rows(service, service, "direct")
    prom = Prometheus(prometheus_dir, {"billing-relay": [relay], "jobs": [worker]})
    prom.start()
    try:
        assert await prom.settled(services, up=2) == {}, prom.tail()
        assert await prom.query("outbox_relay_worker_up") == {f"127.0.0.1:{worker.port}": "1"}
        assert await prom.query("outbox_relay_subscription_enabled") == {}  # no subscription: no gauge
        await produce(service, "no-such-kind-1", None, kind="no.such.kind")
        await prom.firing(services, "OutboxRelayFailedRowsIncreasing")
        await _kill(worker)
        await prom.firing(services, "OutboxRelayNoLiveWorker")
        await service.execute(
            "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload, created_at)"
            " VALUES ('old-1', 'reservation', 'success', '{}', now() - interval '10 minutes')"
        )
        await prom.firing(services, "OutboxRelayPendingRowsOld")
        await _kill(relay)
        alerts = await prom.firing(services, "OutboxRelayNoActiveRelay")
        assert not {"OutboxRelaySubscriptionDisabled", "OutboxRelaySubscriptionErrors"} & set(alerts)
    finally:
        prom.stop()


async def test_replicated_shape_quiet_when_healthy_and_subscription_alerts_fire_when_broken(
    outbox_env: OutboxEnv, service: Any, primary: Any, services: Services, prometheus_dir: Path
) -> None:
    """Replicated shape, an active and a standby relay and a worker in one job of any name: healthy, and
    after the active relay is killed and the standby took over, no alert; a replicated row the service's
    table refuses -> subscription errors; the subscription disabled -> its alert."""
    env = outbox_env.env()
    subscribed = await asyncio.to_thread(run_cli, "subscribe", env=env)
    assert subscribed.returncode == 0, subscribed.stderr
    first, standby, worker = await services.start_fleet(env, relays=("relay-a", "relay-b"))
    await _finish_some_rows(service, primary, "repl")
    prom = Prometheus(prometheus_dir, {"shop-7": [first, standby, worker]})
    prom.start()
    try:
        assert await prom.settled(services, up=3) == {}, prom.tail()
        # the active relay reports its subscription, the standby nothing
        assert await prom.query("outbox_relay_subscription_enabled") == {f"127.0.0.1:{first.port}": "1"}
        await _kill(first)
        await services.ready(standby, role="active")
        assert await prom.settled(services, up=2) == {}, prom.tail()
        # the service's table refuses what the primary sends (a drifted schema): apply fails, retries
        await service.execute("ALTER TABLE outbox_relay.outbox ADD CONSTRAINT drift CHECK (kind <> 'x')")
        await produce(primary, "refused-1", "success", kind="x")
        await prom.firing(services, "OutboxRelaySubscriptionErrors")
        await service.execute(f'ALTER SUBSCRIPTION "{outbox_env.subscription_name}" DISABLE')
        alerts = await prom.firing(services, "OutboxRelaySubscriptionDisabled")
        assert not {"OutboxRelayNoActiveRelay", "OutboxRelayNoLiveWorker"} & set(alerts)
    finally:
        prom.stop()
