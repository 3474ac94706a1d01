"""`doctor` against a real deployment: all ok when healthy, and each misconfiguration made for real."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from outbox_relay.arq_adapter import ArqDiagnostics
from outbox_relay.composition import replication_config
from outbox_relay.doctor import DoctorConfig, Report, run_doctor
from outbox_relay.handlers import registry
from outbox_relay.replication import subscribe
from outbox_relay.sql import query
from tests.conftest import OutboxEnv, create_outbox_env, drop_outbox_env
from tests.helpers import cli_env, connect, produce, run_cli, running_relay, running_worker, wait_until
from tests.servers import PgServer, RedisServer, owned_postgres, owned_redis


@pytest.fixture(scope="module")
def doctor_pg() -> Iterator[PgServer]:
    """A server of this module's own: its settings are changed (a healthy primary bounds slot WAL)."""
    server = owned_postgres()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def doctor_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: tests change its maxmemory-policy."""
    server = owned_redis()
    yield server
    server.cleanup()


@pytest.fixture
async def deployment(doctor_pg: PgServer, doctor_redis: RedisServer) -> AsyncIterator[OutboxEnv]:
    """A replicated deployment: primary, service database, subscription; WAL kept by slots bounded."""
    admin = await connect(doctor_pg.url("postgres"))
    try:
        await admin.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1GB'")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    env = await create_outbox_env(doctor_pg, doctor_redis.url())
    env.defaults["requeue_after"] = 60
    await subscribe(replication_config(env.settings()))
    yield env
    await drop_outbox_env(env)


def _config(env: OutboxEnv, redis_url: str | None = None, **overrides: Any) -> DoctorConfig:
    values: dict[str, Any] = {
        "database_url": env.service_url,
        "queue": lambda name: ArqDiagnostics(redis_url or env.redis_url, name),
        "queue_name": env.queue_name,
        "requeue_after": 60.0,
        "primary_url": env.primary_url,
        "subscription_name": env.subscription_name,
        "plugins": registry.plugins(),
        **overrides,
    }
    return DoctorConfig(**values)


def _by_name(report: Report) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


def _not_ok(report: Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks if c.status != "ok"}


async def _doctor(env: OutboxEnv, **overrides: Any) -> Report:
    return await run_doctor(_config(env, **overrides))


async def _until(env: OutboxEnv, name: str, status: str, **overrides: Any) -> Any:
    """Run doctor until check ``name`` has ``status`` (statistics and workers move asynchronously)."""

    async def probe() -> Any:
        check = _by_name(await _doctor(env, **overrides)).get(name)
        return check if check is not None and check.status == status else None

    return await wait_until(probe, timeout=30, interval=0.3, message=f"doctor: {name} {status}")


async def test_healthy_deployment_is_all_ok_and_exits_0(deployment: OutboxEnv) -> None:
    """With relay and worker running on a sound replicated set-up every check is ok; CLI exit 0, --json."""
    settings = deployment.settings()
    async with running_worker(settings), running_relay(settings) as relay:
        await wait_until(lambda: _true(relay.active.is_set()), message="relay active")
        await _until(deployment, "workers", "ok")
        report = await _doctor(deployment)
        assert _not_ok(report) == {}, report.as_text()
        names = set(_by_name(report))
        assert {
            "schema service",
            "schema reservation",
            "notify trigger",
            "subscription",
            "apply worker",
            "subscription tables",
            "subscription errors",
            "subscription streaming",
            "primary wal_level",
            "primary publication",
            "primary slot",
            "primary max_slot_wal_keep_size",
            "redis",
            "redis maxmemory-policy",
            "relay",
            "workers",
            "oldest pending",
            "notification queue",
            "outbox dead tuples",
            "xmin horizon",
        } <= names, report.as_text()
        result = run_cli("doctor", "--json", env=cli_env(deployment.env(requeue_after="60")))
        assert result.returncode == 0, result.stdout + result.stderr
        checks = json.loads(result.stdout)["checks"]
        assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks)
        assert {c["status"] for c in checks} == {"ok"}, result.stdout
        text = run_cli("doctor", env=cli_env(deployment.env(requeue_after="60")))
        assert text.returncode == 0, text.stdout + text.stderr
        assert all(line.startswith("ok ") for line in text.stdout.splitlines()), text.stdout


async def _true(value: bool) -> bool:
    return value


async def test_no_relay_and_no_worker_fail_and_exit_1(deployment: OutboxEnv) -> None:
    """Nothing running: `relay` and `workers` fail with the command to start them; the CLI exits 1."""
    report = await _doctor(deployment)
    checks = _by_name(report)
    assert checks["relay"].status == "fail"
    assert "outbox-relay run" in checks["relay"].fix
    assert checks["workers"].status == "fail"
    assert "outbox-relay worker" in checks["workers"].fix
    result = run_cli("doctor", env=cli_env(deployment.env()))
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("fail  relay:"))
    assert "fix: start `outbox-relay run`" in line


async def test_disabled_notify_trigger_fails_and_its_fix_works(deployment: OutboxEnv) -> None:
    """A disabled (then a local-only) outbox_notify fails with ENABLE ALWAYS as the fix, which mends it."""
    service = await connect(deployment.service_url)
    try:
        for disable in ("DISABLE TRIGGER outbox_notify", "ENABLE TRIGGER outbox_notify"):
            await service.execute(f"ALTER TABLE outbox_relay.outbox {disable}")
            check = _by_name(await _doctor(deployment))["notify trigger"]
            assert check.status == "fail", check
            assert check.fix == "ALTER TABLE outbox_relay.outbox ENABLE ALWAYS TRIGGER outbox_notify;"
            await service.execute(check.fix)
            assert _by_name(await _doctor(deployment))["notify trigger"].status == "ok"
    finally:
        await service.close()


async def test_disabled_subscription_fails_and_its_fix_works(deployment: OutboxEnv) -> None:
    """A disabled subscription fails subscription and apply worker, the slot goes inactive; ENABLE mends."""
    service = await connect(deployment.service_url)
    try:
        await service.execute(f'ALTER SUBSCRIPTION "{deployment.subscription_name}" DISABLE')
        await _until(deployment, "apply worker", "fail")
        await _until(deployment, "primary slot", "warn")
        checks = _by_name(await _doctor(deployment))
        assert checks["subscription"].status == "fail"
        assert checks["subscription"].fix == f'ALTER SUBSCRIPTION "{deployment.subscription_name}" ENABLE;'
        assert "inactive" in checks["primary slot"].detail
        await service.execute(checks["subscription"].fix)
        await _until(deployment, "primary slot", "ok")
        assert _by_name(await _doctor(deployment))["subscription"].status == "ok"
    finally:
        await service.close()


async def test_dropped_slot_fails_naming_the_fix(deployment: OutboxEnv) -> None:
    """The subscription's slot dropped on the primary: `primary slot` fails, fix re-subscribes."""
    service = await connect(deployment.service_url)
    primary = await connect(deployment.primary_url)
    try:
        await service.execute(f'ALTER SUBSCRIPTION "{deployment.subscription_name}" DISABLE')

        async def dropped() -> bool:
            return bool(
                await primary.fetchval(
                    "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots"
                    " WHERE slot_name = $1 AND NOT active",
                    deployment.subscription_name,
                )
            )

        await wait_until(dropped, timeout=30, interval=0.2, message="slot dropped")
        await service.execute(f'ALTER SUBSCRIPTION "{deployment.subscription_name}" ENABLE')
        check = _by_name(await _doctor(deployment))["primary slot"]
        assert check.status == "fail"
        assert "does not exist" in check.detail
        assert "outbox-relay unsubscribe && outbox-relay subscribe" in check.fix
    finally:
        await primary.close()
        await service.close()


async def test_apply_errors_fail_the_subscription_errors_check(deployment: OutboxEnv) -> None:
    """A change the apply worker cannot apply (a unique violation) shows in `subscription errors`."""
    service = await connect(deployment.service_url)
    primary = await connect(deployment.primary_url)
    try:
        await service.execute("ALTER TABLE outbox_relay.outbox DISABLE TRIGGER outbox_skip_known")
        await produce(service, "dup-1")
        await produce(primary, "dup-1")
        check = await _until(deployment, "subscription errors", "fail")
        assert "pg_stat_reset_subscription_stats" in check.fix
    finally:
        await service.execute(f'ALTER SUBSCRIPTION "{deployment.subscription_name}" DISABLE')
        await primary.close()
        await service.close()


async def test_evicting_redis_fails(deployment: OutboxEnv) -> None:
    """Redis with maxmemory-policy allkeys-lru fails the policy check, with CONFIG SET as the fix."""
    client = aioredis.Redis.from_url(deployment.redis_url)
    try:
        await client.config_set("maxmemory-policy", "allkeys-lru")
        check = _by_name(await _doctor(deployment))["redis maxmemory-policy"]
        assert check.status == "fail"
        assert "allkeys-lru" in check.detail
        assert "CONFIG SET maxmemory-policy noeviction" in check.fix
    finally:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()
    assert _by_name(await _doctor(deployment))["redis maxmemory-policy"].status == "ok"


async def test_unreachable_redis_fails_redis_and_workers(deployment: OutboxEnv) -> None:
    """A Redis nobody listens on fails `redis` and leaves the workers unknown (fail)."""
    checks = _by_name(await _doctor(deployment, redis_url="redis://127.0.0.1:1/0"))
    assert checks["redis"].status == "fail"
    assert checks["workers"].status == "fail"


async def test_schema_behind_or_ahead_fails(deployment: OutboxEnv) -> None:
    """A service schema missing its last migration, or with one from the future, fails `schema service`."""
    service = await connect(deployment.service_url)
    try:
        latest = await service.fetchval(
            "SELECT max(version) FROM outbox_relay.schema_migrations WHERE target = 'service'"
        )
        await service.execute(
            "UPDATE outbox_relay.schema_migrations SET version = 99"
            " WHERE target = 'service' AND version = $1",
            latest,
        )
        check = _by_name(await _doctor(deployment))["schema service"]
        assert (check.status, "newer" in check.detail) == ("fail", True)
        await service.execute(
            "DELETE FROM outbox_relay.schema_migrations WHERE target = 'service' AND version = 99"
        )
        check = _by_name(await _doctor(deployment))["schema service"]
        assert (check.status, check.fix) == ("fail", "outbox-relay migrate")
    finally:
        await service.close()


async def test_publication_publishing_updates_fails_and_its_fix_works(deployment: OutboxEnv) -> None:
    """publish = 'insert, update' fails `primary publication`; the fix SQL restores 'insert' only."""
    primary = await connect(deployment.primary_url)
    try:
        await primary.execute("ALTER PUBLICATION outbox_relay SET (publish = 'insert, update')")
        check = _by_name(await _doctor(deployment))["primary publication"]
        assert check.status == "fail"
        assert "update" in check.detail
        await primary.execute(check.fix)
        assert _by_name(await _doctor(deployment))["primary publication"].status == "ok"
    finally:
        await primary.close()


async def test_unbounded_slot_wal_warns(deployment: OutboxEnv, doctor_pg: PgServer) -> None:
    """max_slot_wal_keep_size = -1 on the primary warns, with ALTER SYSTEM as the fix."""
    admin = await connect(doctor_pg.url("postgres"))
    try:
        await admin.execute("ALTER SYSTEM SET max_slot_wal_keep_size = -1")
        await admin.execute("SELECT pg_reload_conf()")
        check = await _until(deployment, "primary max_slot_wal_keep_size", "warn")
        assert "ALTER SYSTEM SET max_slot_wal_keep_size" in check.fix
    finally:
        await admin.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.close()


async def test_old_pending_row_warns_then_fails(deployment: OutboxEnv) -> None:
    """A pending row older than REQUEUE_AFTER warns; older than 5 x REQUEUE_AFTER fails."""
    service = await connect(deployment.service_url)
    try:
        await produce(service, "old-1")
        await service.execute(
            "UPDATE outbox_relay.outbox SET created_at = now() - interval '90 seconds'"
            " WHERE correlation_id = 'old-1'"
        )
        assert _by_name(await _doctor(deployment))["oldest pending"].status == "warn"
        await service.execute(
            "UPDATE outbox_relay.outbox SET created_at = now() - interval '1 hour'"
            " WHERE correlation_id = 'old-1'"
        )
        assert _by_name(await _doctor(deployment))["oldest pending"].status == "fail"
    finally:
        await service.close()


async def test_old_transaction_holding_xmin_is_named(
    deployment: OutboxEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session holding an old snapshot is named by pid, with pg_terminate_backend as the fix."""
    import outbox_relay.doctor as doctor

    monkeypatch.setattr(doctor, "OLD_XACT_WARN", 0.5)
    holder = await connect(deployment.service_url)
    try:
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT count(*) FROM outbox_relay.outbox")
        pid = await holder.fetchval("SELECT pg_backend_pid()")
        check = await _until(deployment, "xmin horizon", "warn")
        assert f"pid {pid}" in check.detail
        assert f"pg_terminate_backend({pid})" in check.fix
    finally:
        await holder.close()


async def test_expired_lease_of_the_lock_holder_warns(deployment: OutboxEnv) -> None:
    """A session holding the relay lock whose lease (migration 0003) has expired warns, naming the
    epoch (what a frozen relay looks like before the server ends its session); a valid lease is ok."""
    service = await connect(deployment.service_url)
    holder = await connect(deployment.service_url)  # holds the lock, renews nothing: frozen
    try:
        assert await holder.fetchval(query("try_relay_lock"))
        await service.execute(
            "UPDATE outbox_relay.relay_lease"
            " SET holder = 'x', epoch = 7, expires_at = now() - interval '1 min'"
        )
        check = _by_name(await _doctor(deployment))["relay"]
        assert check.status == "warn", check
        assert "epoch 7" in check.detail
        await service.execute("UPDATE outbox_relay.relay_lease SET expires_at = now() + interval '1 min'")
        assert _by_name(await _doctor(deployment))["relay"].status == "ok"
    finally:
        await holder.close()
        await service.close()


async def test_direct_shape_without_primary_reports_no_subscription_as_ok(deployment: OutboxEnv) -> None:
    """Without PRIMARY_URL and without a subscription, doctor reports the direct shape, not a failure."""
    service = await connect(deployment.service_url)
    try:
        await drop_outbox_env_subscription(deployment)
        checks = _by_name(await _doctor(deployment, primary_url=None, subscription_name=None))
        assert checks["subscription"].status == "ok"
        assert "direct" in checks["subscription"].detail
        assert not any(name.startswith("primary") for name in checks)
    finally:
        await service.close()


async def drop_outbox_env_subscription(env: OutboxEnv) -> None:
    from outbox_relay.replication import unsubscribe

    await unsubscribe(replication_config(env.settings()))
