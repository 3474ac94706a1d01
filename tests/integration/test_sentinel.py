"""Redis behind Sentinel: a master, one replica and three sentinels (Debian's redis-server), for real.

The relay, the workers and `doctor` get a ``redis+sentinel://`` URL; the master is
SIGKILLed under load and the replica promoted: every row finishes, each effect once,
money conserved. A service name no sentinel knows fails `doctor` (naming it) and keeps
a worker up, not ready, saying why. The set's password is never in a log or an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox_relay.arq_adapter import ArqDiagnostics
from outbox_relay.composition import replication_config
from outbox_relay.replication import subscribe
from tests.conftest import OutboxEnv, create_outbox_env, drop_outbox_env
from tests.helpers import Services, cli_env, http_get, run_cli
from tests.integration.test_faults import (
    assert_plain_log,
    assert_running,
    assert_settled,
    at_least_finished,
    finished_count,
    prepare_load,
    produce,
)
from tests.servers import PgServer, SentinelSet, sentinel_unavailable

#: Where the failover test writes what it measured (the README's numbers; .bench/ is not committed).
MEASURED = Path(__file__).resolve().parents[2] / ".bench" / "sentinel-failover.txt"


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    """A fresh Sentinel set per test (a test kills its master); skipped without redis-server."""
    reason = sentinel_unavailable()
    if reason:
        pytest.skip(reason)
    found = SentinelSet()
    try:
        found.start()
        yield found
    finally:
        found.cleanup()


@pytest.fixture
async def env(pg_server: PgServer, sentinels: SentinelSet) -> AsyncIterator[OutboxEnv]:
    """Fresh, migrated primary and service databases, the queue behind the Sentinel set."""
    outbox_env = await create_outbox_env(pg_server, sentinels.url())
    yield outbox_env
    await drop_outbox_env(outbox_env)


async def test_doctor_reports_sentinels_master_and_replicas(env: OutboxEnv, sentinels: SentinelSet) -> None:
    """`doctor` names the sentinels reached, the master and its replica; the password is never shown."""
    diagnosis = await ArqDiagnostics(sentinels.url(), env.queue_name).diagnose()
    checks = {c.name: c for c in diagnosis.checks}
    assert diagnosis.reachable, diagnosis
    line = checks["redis sentinel"]
    assert line.status == "ok", line
    assert "3 of 3 sentinels reached" in line.detail
    assert f"master 127.0.0.1:{sentinels.master_port()}" in line.detail
    assert "1 replica(s)" in line.detail, line.detail
    replica = next(port for port in sentinels.nodes if port != sentinels.master_port())
    assert f"127.0.0.1:{replica} (link " in line.detail, line.detail
    assert checks["redis"].status == "ok", checks["redis"]
    result = run_cli("doctor", env=cli_env(env.env()))
    assert "ok    redis sentinel: 3 of 3 sentinels reached" in result.stdout, result.stdout + result.stderr
    assert sentinels.password not in result.stdout + result.stderr


async def test_unknown_service_fails_doctor_naming_it(env: OutboxEnv, sentinels: SentinelSet) -> None:
    """A service no sentinel knows: doctor's sentinel and redis lines fail, naming it; exit 1, no secret."""
    url = sentinels.url("no-such-service")
    diagnosis = await ArqDiagnostics(url, env.queue_name).diagnose()
    assert not diagnosis.reachable
    line = {c.name: c for c in diagnosis.checks}["redis sentinel"]
    assert line.status == "fail"
    assert "none knows the service 'no-such-service'" in line.detail, line.detail
    result = run_cli("doctor", env=cli_env(env.env(redis_url=url)))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fail  redis sentinel: 3 of 3 sentinels reached, and none knows the service" in result.stdout
    assert sentinels.password not in result.stdout + result.stderr


async def test_worker_on_unknown_service_stays_up_and_says_why(
    env: OutboxEnv, sentinels: SentinelSet, services: Services
) -> None:
    """A worker given a service no sentinel knows stays up, not ready, one line per attempt naming it."""
    worker = services.start_worker("worker", cli_env(env.env(redis_url=sentinels.url("no-such-service"))))
    await services.wait_logged(worker, "No master found for 'no-such-service'", count=3, timeout=60)
    assert worker.port is not None
    status, body = await http_get(worker.port, "/readyz")
    assert status == 503, body
    assert body["ready"] is False, body
    assert_running(worker)
    assert_plain_log(worker)
    assert sentinels.password not in worker.text()


@pytest.mark.slow
async def test_master_sigkilled_under_load_loses_nothing(
    env: OutboxEnv, sentinels: SentinelSet, services: Services, record_property: Any
) -> None:
    """Relay and two workers on a Sentinel URL, 600 rows streaming, the master SIGKILLed after a third:
    the replica is promoted, every row finishes, each effect once, money conserved."""
    await subscribe(replication_config(env.settings()))
    load = await prepare_load(env.service_url, 600, prefix="sentinel")
    fleet = await services.start_fleet(cli_env(env.env()), workers=("worker-a", "worker-b"))
    producer = asyncio.create_task(produce(env.primary_url, load.rows, chunk=5, pause=0.05))
    try:
        await services.wait(at_least_finished(env.service_url, 200), message="a third finished")
        assert not producer.done(), "the load ended before the master was killed"
        done_at_kill = await finished_count(env.service_url)
        old = await asyncio.to_thread(sentinels.kill_master)
        killed_at = time.monotonic()
        await services.wait(at_least_finished(env.service_url, done_at_kill + 1), timeout=60)
        next_row = time.monotonic() - killed_at  # may be a job the old master had handed out
        new = await asyncio.to_thread(sentinels.wait_for_failover, old)
        promoted = time.monotonic() - killed_at
        done_at_promotion = await finished_count(env.service_url)
        await services.wait(at_least_finished(env.service_url, done_at_promotion + 1), timeout=60)
        resumed = time.monotonic() - killed_at
        await producer
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
    await services.wait(at_least_finished(env.service_url, len(load.rows)), timeout=90, message="all rows")
    total = time.monotonic() - killed_at
    line = (
        f"master {old} SIGKILLed with {done_at_kill}/600 rows finished; next finished row "
        f"{next_row:.2f} s after the kill; replica {new} named master by the sentinels {promoted:.2f} s "
        f"after it, the next row finished {resumed:.2f} s after it; all 600 finished {total:.1f} s after it"
    )
    print(line)
    record_property("kill_to_next_finished_row_s", round(next_row, 2))
    record_property("kill_to_first_row_finished_after_promotion_s", round(resumed, 2))
    MEASURED.parent.mkdir(exist_ok=True)
    MEASURED.write_text(line + "\n")
    assert_running(*fleet)
    await assert_settled(env.service_url, load)
    # The promoted replica has another run_id: the relay's next sweep sees a new epoch and hands every
    # queued row over again (a job the old master had not replicated is enqueued anew).
    await services.wait_logged(fleet[0], "restarted or failed over (it may have lost jobs)", timeout=30)
    for service in fleet:
        assert sentinels.password not in service.text(), f"password in {service.name}.log"
