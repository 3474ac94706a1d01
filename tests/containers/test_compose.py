"""The container, proven: build the image, run compose.yaml, settle a reservation, kill the active relay.

Run by ``./dev test-containers`` (marker ``containers``; the default ``./dev test`` deselects it). It
needs a Docker engine with compose v2 and the base images named by OUTBOX_RELAY_PYTHON_IMAGE,
OUTBOX_RELAY_POSTGRES_IMAGE and OUTBOX_RELAY_REDIS_IMAGE (the official images by default);
``./dev test-containers`` starts one with ``../shared/tools/container-engine.sh`` when none answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.containers

RELAYS = ("relay", "relay-standby")
#: Seconds: generous, for the slow day on a shared 2-core machine.
SETTLE_TIMEOUT = 60.0
TAKEOVER_TIMEOUT = 60.0


def timing(label: str, started: float) -> None:
    print(f"[containers] {label}: {time.monotonic() - started:.1f} s", flush=True)


class Compose:
    """``docker compose`` on the repository's compose.yaml under a project name of its own."""

    def __init__(self, project: str) -> None:
        self.project = project

    def run(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["docker", "compose", "-p", self.project, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def sql(self, service: str, database: str, statement: str) -> str:
        """Run one statement with psql in ``service``; its unaligned output."""
        result = self.run(
            "exec",
            "-T",
            service,
            "psql",
            "-U",
            "postgres",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-tAc",
            statement,
        )
        return result.stdout.strip()

    def ps(self) -> list[dict[str, Any]]:
        """``docker compose ps --format json``: one object per running container."""
        out = self.run("ps", "--format", "json").stdout.strip()
        if out.startswith("["):
            return list(json.loads(out))
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def container(self, service: str) -> str:
        ids = self.run("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"expected one {service} container, got {ids}"
        return ids[0]

    def readyz(self, service: str) -> dict[str, Any] | None:
        """The JSON body of ``service``'s /readyz (probed inside it); None if it does not answer."""
        probe = (
            "import urllib.request, urllib.error, sys\n"
            "try:\n    body = urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).read()\n"
            "except urllib.error.HTTPError as e:\n    body = e.read()\n"
            "sys.stdout.write(body.decode())"
        )
        result = self.run("exec", "-T", service, "python", "-c", probe, check=False, timeout=30)
        if result.returncode != 0:
            return None
        try:
            return dict(json.loads(result.stdout))
        except ValueError:
            return None


def inspect(container: str, template: str) -> str:
    return subprocess.run(
        ["docker", "inspect", "-f", template, container], capture_output=True, text=True, check=True
    ).stdout.strip()


def poll(predicate: Callable[[], Any], *, timeout: float, message: str, interval: float = 0.5) -> Any:
    """Call ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message} (last: {last!r})")


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    """The stack, built and up (``up -d --wait``); torn down with its volumes afterwards."""
    if shutil.which("docker") is None:
        pytest.fail("no docker client: run ./dev test-containers, which starts an engine")
    stack = Compose(f"outbox_relay_test_{uuid.uuid4().hex[:8]}")
    started = time.monotonic()
    stack.run("build", timeout=900)
    timing("image build", started)
    try:
        started = time.monotonic()
        stack.run("up", "-d", "--wait", "--wait-timeout", "240", timeout=300)
        timing("compose up --wait (every service healthy)", started)
        yield stack
    finally:
        if os.environ.get("OUTBOX_RELAY_KEEP_STACK") != "1":
            started = time.monotonic()
            stack.run("down", "-v", "--remove-orphans", "--timeout", "5", timeout=180, check=False)
            timing("compose down -v", started)


def settle(stack: Compose, correlation_id: str) -> float:
    """Open an account and a reservation on the replica, commit the outbox row on the primary,
    wait until the row is finished and the reservation burned; the seconds it took."""
    account = f"acct-{correlation_id}"
    stack.sql("replica", "service", f"INSERT INTO ledger.accounts (id, balance) VALUES ('{account}', 1000)")
    stack.sql("replica", "service", f"SELECT ledger.reserve('{account}', 100, '{correlation_id}')")
    started = time.monotonic()
    stack.sql(
        "primary",
        "app",
        f"INSERT INTO outbox_relay.outbox (correlation_id, outcome) VALUES ('{correlation_id}', 'success')",
    )

    def settled() -> bool:
        row = stack.sql(
            "replica",
            "service",
            "SELECT o.status || ',' || r.state FROM outbox_relay.outbox o "
            f"JOIN ledger.reservations r USING (correlation_id) WHERE o.correlation_id = '{correlation_id}'",
        )
        return row == "finished,burned"

    poll(settled, timeout=SETTLE_TIMEOUT, message=f"{correlation_id} finished and its reservation burned")
    return time.monotonic() - started


def active_relay(stack: Compose) -> str | None:
    roles = {service: (stack.readyz(service) or {}).get("role") for service in RELAYS}
    active = [service for service, role in roles.items() if role == "active"]
    return active[0] if len(active) == 1 else None


def all_healthy(stack: Compose) -> list[dict[str, Any]] | None:
    containers = stack.ps()
    services = {c["Service"] for c in containers}
    expected = {"primary", "replica", "redis", *RELAYS, "worker"}
    if services != expected or any(c.get("Health") != "healthy" for c in containers):
        return None
    return containers


def test_the_stack_settles_a_reservation_and_survives_the_active_relay_dying(compose: Compose) -> None:
    """compose.yaml end to end: a row committed on the primary is finished and its reservation burned;
    every service is healthy; SIGKILLing the active relay's process restarts it (restart policy) and a
    relay is active again; stopping the active relay makes the standby take over; rows keep finishing."""
    stack = compose
    seconds = settle(stack, "ctr-1")
    print(f"[containers] first row committed -> finished and burned: {seconds:.2f} s", flush=True)

    containers = poll(lambda: all_healthy(stack), timeout=60, message="every service healthy in compose ps")
    assert sum(c["Service"] == "worker" for c in containers) == 2  # deploy.replicas: 2
    print("[containers] healthy: " + ", ".join(sorted(c["Name"] for c in containers)), flush=True)

    # 1. A crash: SIGKILL the active relay's main process from the host (not `docker stop`, so the
    #    restart policy applies; PID 1 cannot be SIGKILLed from inside its own namespace).
    active = poll(lambda: active_relay(stack), timeout=30, message="exactly one active relay")
    standby = next(s for s in RELAYS if s != active)
    assert (stack.readyz(standby) or {}).get("role") == "standby"
    container = stack.container(active)
    restarts = int(inspect(container, "{{.RestartCount}}"))
    pid = int(inspect(container, "{{.State.Pid}}"))
    killed_at = time.monotonic()
    os.kill(pid, 9)

    def restarted() -> bool:
        return (
            int(inspect(container, "{{.RestartCount}}")) > restarts
            and inspect(container, "{{.State.Running}}") == "true"
            and int(inspect(container, "{{.State.Pid}}")) != pid
        )

    poll(restarted, timeout=TAKEOVER_TIMEOUT, message=f"{active} restarted by its restart policy")
    print(f"[containers] {active} restarted {time.monotonic() - killed_at:.1f} s after SIGKILL", flush=True)
    leader = poll(lambda: active_relay(stack), timeout=TAKEOVER_TIMEOUT, message="a relay active again")
    # Whichever wins the lock (the standby polling it, or the restarted relay) is fine; both answer.
    print(
        f"[containers] {leader} active {time.monotonic() - killed_at:.1f} s after SIGKILL of {active}",
        flush=True,
    )
    seconds = settle(stack, "ctr-2")
    print(f"[containers] row after the crash committed -> finished and burned: {seconds:.2f} s", flush=True)

    # 2. The standby takes over: stop the active relay (a stopped container is not restarted).
    follower = next(s for s in RELAYS if s != leader)
    stopped_at = time.monotonic()
    stack.run("stop", "--timeout", "10", leader, timeout=60)
    poll(
        lambda: active_relay(stack) == follower,
        timeout=TAKEOVER_TIMEOUT,
        message=f"{follower} to take over from the stopped {leader}",
    )
    print(
        f"[containers] {follower} took over {time.monotonic() - stopped_at:.1f} s after stopping {leader}",
        flush=True,
    )
    seconds = settle(stack, "ctr-3")
    print(f"[containers] row after the takeover: committed -> finished, burned: {seconds:.2f} s", flush=True)
    stack.run("start", leader, timeout=60)
    poll(lambda: all_healthy(stack), timeout=90, message="every service healthy again")
    assert (stack.readyz(leader) or {}).get("role") == "standby"  # back, standing by
    status = json.loads(stack.run("run", "--rm", "--no-deps", "-T", "relay", "status", "--json").stdout)
    assert status["counts"] == {"new": 0, "queued": 0, "finished": 3, "failed": 0}


def test_the_image_holds_no_benchmark(compose: Compose) -> None:
    """The operator image has no `bench` command and no bench code: `outbox-relay bench` is unknown
    (exit 2) and neither `bench` nor `outbox_relay.devtools.bench` imports."""
    command = compose.run("run", "--rm", "--no-deps", "-T", "worker", "bench", check=False, timeout=120)
    assert command.returncode == 2, command.stdout + command.stderr
    assert "invalid choice: 'bench'" in command.stderr
    probe = (
        "import importlib.util, sys; "
        "sys.exit(any(importlib.util.find_spec(m) for m in ('bench', 'outbox_relay.devtools.bench')))"
    )
    found = compose.run(
        "run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "worker", "-c", probe, check=False
    )
    assert found.returncode == 0, found.stdout + found.stderr
