"""Hosts whose clocks are off (issue 15, item 4): the queue goes by Redis's clock, and `doctor` says so.

The clocks are really shifted: the worker or `doctor` runs under libfaketime (Debian's `libfaketime`,
LD_PRELOAD), so everything in that process, arq and redis-py included, reads the shifted time. Where
libfaketime is not installed these tests skip saying so (`.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from glob import glob
from typing import Any

import pytest

from tests.acceptance.test_cli import cli
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env, count_status, open_account, produce, reserve

_CANDIDATES = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib*/faketime/libfaketime.so.1")
LIBFAKETIME = next((path for pattern in _CANDIDATES for path in sorted(glob(pattern))), None)

pytestmark = pytest.mark.skipif(
    LIBFAKETIME is None,
    reason="libfaketime is not installed (apt-get install -y faketime libfaketime; .ci/run installs it)",
)

ROWS = 10


def shifted(env: dict[str, str], shift: str) -> dict[str, str]:
    """``env`` for a process whose wall clock is ``shift`` (e.g. ``-30s``) off; its monotonic clock
    is left alone (timeouts and sleeps stay true)."""
    assert LIBFAKETIME is not None
    return {**env, "LD_PRELOAD": LIBFAKETIME, "FAKETIME": shift, "DONT_FAKE_MONOTONIC": "1"}


async def _clock_of(env: dict[str, str]) -> float:
    """How far the wall clock of a process started with ``env`` is from this one's (s)."""
    before = time.time()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "import time; print(time.time())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout) - (before + time.time()) / 2


@pytest.mark.parametrize("shift", ["-30s", "+30s"])
async def test_a_worker_with_a_shifted_clock_takes_rows_at_once(
    outbox_env: OutboxEnv, service: Any, services: Services, shift: str
) -> None:
    """A worker 30 s behind (or ahead of) the relay, PostgreSQL and Redis finishes rows within
    a second or two of their commit: jobs are due by Redis's clock, not the worker's."""
    env = cli_env(outbox_env.env())
    worker_env = shifted(env, shift)
    assert abs(abs(await _clock_of(worker_env)) - 30) < 2, "libfaketime did not shift the clock"
    await services.start_fleet(env, relays=("relay",), workers=())
    await services.ready(services.start_worker("worker", worker_env), role="worker")
    await open_account(service, "acc", 10 * ROWS)
    for i in range(ROWS):
        await reserve(service, "acc", 1, f"skew-{i}")
        await produce(service, f"skew-{i}", "success")

    async def all_finished() -> bool:
        return await count_status(service, "finished") == ROWS

    await services.wait(all_finished, timeout=60, message=f"{ROWS} rows finished")
    slowest = await service.fetchval(
        "SELECT max(extract(epoch FROM finished_at - created_at))::float8 FROM outbox_relay.outbox"
    )
    assert slowest < 2.0, f"a row took {slowest:.1f} s from commit to finished\n{services.tails()}"


async def test_doctor_warns_when_this_host_clock_is_off(outbox_env: OutboxEnv) -> None:
    """`doctor`'s clocks line is ok on this host, and warns run 30 s behind PostgreSQL and Redis."""
    env = cli_env(outbox_env.env())

    async def clocks(run_env: dict[str, str]) -> dict[str, Any]:
        result = await cli("doctor", "--json", env=run_env)
        lines = [c for c in json.loads(result.stdout)["checks"] if c["name"] == "clocks"]
        assert len(lines) == 1, result.stdout
        line: dict[str, Any] = lines[0]
        return line

    healthy = await clocks(env)
    assert healthy["status"] == "ok", healthy
    assert "PostgreSQL" in healthy["detail"], healthy
    assert "Redis" in healthy["detail"], healthy
    off = await clocks(shifted(env, "-30s"))
    assert off["status"] == "warn", off
    assert "ahead of this host" in off["detail"], off
    assert "NTP" in off["fix"], off
