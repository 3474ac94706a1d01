"""Relay and worker processes started by `demo` and the benchmark: the real CLI, as an operator runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from outbox_relay.settings import Settings


def service_env(settings: Settings) -> dict[str, str]:
    """This process's environment without any OUTBOX_RELAY_*, plus what `run` and `worker` need."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
    env.update(
        {
            "OUTBOX_RELAY_DATABASE_URL": settings.require_database_url(),
            "OUTBOX_RELAY_REDIS_URL": settings.redis_url.get_secret_value(),
            "OUTBOX_RELAY_LOG_LEVEL": "WARNING",
        }
    )
    if settings.queue_name is not None:  # else derived from the service database, as in production
        env["OUTBOX_RELAY_QUEUE_NAME"] = settings.queue_name
    return env


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python ARGS`` in the background, its output appended to ``log``."""
    with log.open("ab") as handle:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=handle, stderr=subprocess.STDOUT)


def stop(processes: Iterable[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """SIGTERM every process still running, wait for them, SIGKILL what outlives ``timeout``."""
    procs = list(processes)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def log_tails(workdir: Path, lines: int = 15) -> str:
    """The last lines of every ``*.log`` in ``workdir`` (for error messages)."""
    return "\n".join(
        f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        for path in sorted(workdir.glob("*.log"))
    )
