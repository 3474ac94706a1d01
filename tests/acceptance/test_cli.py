"""The command line as an operator runs it: exit codes, messages, idempotent set-up, status, requeue."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from outbox_relay.cli import build_parser
from outbox_relay.db import quote_ident
from tests.conftest import OutboxEnv
from tests.helpers import (
    REPO,
    Services,
    cli_env,
    count_status,
    open_account,
    produce,
    reserve,
    run_cli,
    wait_until,
)
from tests.servers import PgServer

SECRET = "s3cr3tpw"
#: A URL whose password must never be printed, on a port where nothing listens.
SECRET_DB_URL = f"postgresql://u:{SECRET}@127.0.0.1:1/db"
SECRET_REDIS_URL = f"redis://:{SECRET}@127.0.0.1:1/0"
#: Well-formed settings that reach nothing: a command that gets past its settings would hang or fail late.
UNREACHABLE = {"OUTBOX_RELAY_DATABASE_URL": "postgresql://u@127.0.0.1:1/db"}


async def cli(*args: str, env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``run_cli`` off the event loop."""
    return await asyncio.to_thread(run_cli, *args, env=env, timeout=timeout)


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """Everything a failed assertion on a CLI run needs to show."""
    return f"exit {result.returncode}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"


def assert_settings_error(result: subprocess.CompletedProcess[str], variable: str) -> None:
    """Exit 2, one line on stderr naming ``variable``, no traceback, nothing on stdout."""
    assert result.returncode == 2, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, describe(result)
    assert variable in lines[0], describe(result)
    assert "Traceback" not in result.stderr
    assert result.stdout == "", describe(result)


@pytest.fixture
async def blank_databases(pg_server: PgServer) -> AsyncIterator[tuple[str, str]]:
    """Two empty databases (service, primary): nothing migrated."""
    names = [f"blank_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    admin = await asyncpg.connect(pg_server.url("postgres"))
    try:
        for name in names:
            await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
        yield pg_server.url(names[0]), pg_server.url(names[1])
        for name in names:
            await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await admin.close()


async def make_failed(conn: Any, *cids: str) -> None:
    """Rows that a worker gave up on (the state `requeue` works on)."""
    for cid in cids:
        await produce(conn, cid)
    await conn.execute(
        "UPDATE outbox_relay.outbox SET status = 'failed', attempts = 5, last_error = 'boom',"
        " finished_at = now() WHERE correlation_id = ANY($1::text[])",
        list(cids),
    )


async def hand_over(services: Services, env: dict[str, str], conn: Any, n: int) -> None:
    """Run the relay (`run`) until ``n`` rows are queued, then stop it with SIGTERM."""
    relay = services.start("relay", "run", env=env)

    async def queued() -> bool:
        return await count_status(conn, "queued") == n

    await services.wait(queued, message=f"{n} rows queued")
    relay.proc.send_signal(signal.SIGTERM)
    assert await services.wait_exit(relay, timeout=20) == 0, services.tails()


# -- usage and settings -----------------------------------------------------------------


def _commands() -> list[str]:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help_exits_0(command: str | None) -> None:
    """`--help`, of the program and of each command, prints usage and exits 0."""
    args = ["--help"] if command is None else [command, "--help"]
    result = run_cli(*args, env=cli_env({}), timeout=30)
    assert result.returncode == 0, describe(result)
    assert result.stdout.startswith("usage:"), describe(result)
    if command is not None:
        assert command in result.stdout.splitlines()[0]


def test_console_script_is_the_same_program() -> None:
    """The `outbox-relay` console script runs the same CLI (help exits 0 and lists the commands)."""
    script = Path(sys.executable).parent / "outbox-relay"
    result = subprocess.run(
        [str(script), "--help"], env=cli_env({}), capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert result.returncode == 0, describe(result)
    for command in ("migrate", "subscribe", "unsubscribe", "run", "worker", "status", "requeue", "demo"):
        assert command in result.stdout


def test_no_command_is_a_usage_error() -> None:
    """Without a command the CLI exits 2 with a usage message."""
    result = run_cli(env=cli_env({}), timeout=30)
    assert result.returncode == 2, describe(result)
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("OUTBOX_RELAY_SWEEP_INTERVAL", "0", "run"),
        ("OUTBOX_RELAY_SWEEP_INTERVAL", "-1", "run"),
        ("OUTBOX_RELAY_SWEEP_INTERVAL", "abc", "run"),
        ("OUTBOX_RELAY_REQUEUE_AFTER", "0", "run"),
        ("OUTBOX_RELAY_MAX_ATTEMPTS", "0", "worker"),
        ("OUTBOX_RELAY_MAX_ATTEMPTS", "0", "status"),
        ("OUTBOX_RELAY_DATABASE_URL", "mysql://x", "status"),
        ("OUTBOX_RELAY_DATABASE_URL", "mysql://x", "run"),
        ("OUTBOX_RELAY_REDIS_URL", "http://x", "worker"),
        ("OUTBOX_RELAY_REDIS_URL", "http://x", "run"),
    ],
)
def test_bad_setting_exits_2_naming_the_variable(variable: str, value: str, command: str) -> None:
    """An invalid setting exits 2 with one stderr line naming its variable, before connecting anywhere."""
    result = run_cli(command, env=cli_env(UNREACHABLE, **{variable: value}), timeout=30)
    assert_settings_error(result, variable)


def test_bad_setting_given_as_a_flag_names_the_variable() -> None:
    """`run --sweep-interval 0` is refused like OUTBOX_RELAY_SWEEP_INTERVAL=0."""
    result = run_cli("run", "--sweep-interval", "0", env=cli_env(UNREACHABLE), timeout=30)
    assert_settings_error(result, "OUTBOX_RELAY_SWEEP_INTERVAL")


@pytest.mark.parametrize(
    "args", [("status",), ("run",), ("worker",), ("migrate",), ("requeue", "--all-failed")]
)
def test_missing_database_url_exits_2(args: tuple[str, ...]) -> None:
    """Without OUTBOX_RELAY_DATABASE_URL every command but `demo` exits 2 naming it."""
    result = run_cli(*args, env=cli_env({}), timeout=30)
    assert_settings_error(result, "OUTBOX_RELAY_DATABASE_URL")


@pytest.mark.parametrize("args", [("migrate", "--primary"), ("subscribe",), ("unsubscribe",)])
def test_missing_primary_url_exits_2(args: tuple[str, ...]) -> None:
    """The commands that need the primary exit 2 naming OUTBOX_RELAY_PRIMARY_URL when it is missing."""
    result = run_cli(*args, env=cli_env(UNREACHABLE), timeout=30)
    assert_settings_error(result, "OUTBOX_RELAY_PRIMARY_URL")


def test_invalid_url_is_refused_without_showing_its_password() -> None:
    """A URL of the wrong scheme is refused (exit 2) without echoing its password."""
    result = run_cli("status", env=cli_env({"OUTBOX_RELAY_DATABASE_URL": f"mysql://u:{SECRET}@x/db"}))
    assert_settings_error(result, "OUTBOX_RELAY_DATABASE_URL")
    assert SECRET not in result.stderr


# -- secrets and unreachable servers --------------------------------------------------


def test_status_with_unreachable_database_exits_1_without_the_password() -> None:
    """`status` against a closed port exits 1 within seconds with a clear message and no password."""
    started = time.monotonic()
    result = run_cli("status", env=cli_env({"OUTBOX_RELAY_DATABASE_URL": SECRET_DB_URL}), timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, describe(result)
    assert elapsed < 15, f"took {elapsed:.1f} s"
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot reach the service database" in last, describe(result)
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_one_off_commands_never_print_passwords() -> None:
    """migrate, migrate --primary, subscribe, unsubscribe and requeue fail with exit 1 and no password."""
    env = cli_env(
        {"OUTBOX_RELAY_DATABASE_URL": SECRET_DB_URL, "OUTBOX_RELAY_PRIMARY_URL": SECRET_DB_URL},
        OUTBOX_RELAY_LOG_LEVEL="DEBUG",
    )
    commands = [
        ("migrate",),
        ("migrate", "--primary"),
        ("subscribe",),
        ("unsubscribe",),
        ("requeue", "--all-failed"),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "outbox_relay", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for args in commands
    ]
    try:
        outputs = [proc.communicate(timeout=40) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for args, proc, (out, err) in zip(commands, procs, outputs, strict=True):
        shown = f"{' '.join(args)}: exit {proc.returncode}\n{out}\n{err}"
        assert proc.returncode == 1, shown
        assert "cannot reach" in err.strip().splitlines()[-1], shown
        assert SECRET not in out + err, shown
        assert "Traceback" not in err, shown


async def test_services_retry_unreachable_servers_without_printing_passwords(
    outbox_env: OutboxEnv, services: Services
) -> None:
    """`run` and `worker` retry unreachable servers plainly, never print a password, stop on SIGTERM."""
    unreachable_db = cli_env({"OUTBOX_RELAY_DATABASE_URL": SECRET_DB_URL}, OUTBOX_RELAY_LOG_LEVEL="DEBUG")
    unreachable_redis = cli_env(
        outbox_env.env(redis_url=SECRET_REDIS_URL),
        OUTBOX_RELAY_LOG_LEVEL="DEBUG",
        OUTBOX_RELAY_LOG_FORMAT="json",
    )
    watched = [
        (services.start("relay-no-db", "run", env=unreachable_db), "cannot reach the service database"),
        (services.start("worker-no-db", "worker", env=unreachable_db), "cannot reach the service database"),
        (services.start("relay-no-redis", "run", env=unreachable_redis), "cannot reach Redis"),
        (services.start("worker-no-redis", "worker", env=unreachable_redis), "cannot reach Redis"),
    ]
    for service, needle in watched:
        await services.wait_logged(service, needle, count=3)
    for service, _ in watched:
        assert service.running(), services.tails()
        service.proc.send_signal(signal.SIGTERM)
    for service, _ in watched:
        assert await services.wait_exit(service, timeout=20) == 0, services.tails()
        text = service.text()
        assert SECRET not in text, f"{service.name} printed the password:\n{text}"
        assert "Traceback" not in text, services.tails()


# -- migrate, subscribe, unsubscribe ----------------------------------------------------


async def test_migrate_twice_then_up_to_date(blank_databases: tuple[str, str]) -> None:
    """`migrate` creates the service schema; run again it says it is up to date (both exit 0)."""
    service_url, _ = blank_databases
    env = cli_env({"OUTBOX_RELAY_DATABASE_URL": service_url})
    first = await cli("migrate", env=env)
    assert first.returncode == 0, describe(first)
    assert "applied" in first.stdout, describe(first)
    second = await cli("migrate", env=env)
    assert second.returncode == 0, describe(second)
    assert "up to date" in second.stdout, describe(second)
    conn = await asyncpg.connect(service_url)
    try:
        trigger = await conn.fetchval(
            "SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'outbox_notify'"
            " AND tgrelid = 'outbox_relay.outbox'::regclass"
        )
        assert trigger == "A", "the notify trigger must fire for replicated rows (ENABLE ALWAYS)"
        assert await conn.fetchval("SELECT to_regclass('ledger.reservations') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regproc('ledger.reserve') IS NOT NULL")
    finally:
        await conn.close()


async def test_migrate_primary_twice_then_up_to_date(blank_databases: tuple[str, str]) -> None:
    """`migrate --primary` creates the producer table and an insert-only publication; again: up to date."""
    service_url, primary_url = blank_databases
    env = cli_env({"OUTBOX_RELAY_DATABASE_URL": service_url, "OUTBOX_RELAY_PRIMARY_URL": primary_url})
    first = await cli("migrate", "--primary", env=env)
    assert first.returncode == 0, describe(first)
    assert "applied" in first.stdout, describe(first)
    second = await cli("migrate", "--primary", env=env)
    assert second.returncode == 0, describe(second)
    assert "up to date" in second.stdout, describe(second)
    conn = await asyncpg.connect(primary_url)
    try:
        publication = await conn.fetchrow(
            "SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = 'outbox_relay'"
        )
        assert publication is not None
        assert tuple(publication) == (True, False, False)
    finally:
        await conn.close()
    service = await asyncpg.connect(service_url)
    try:
        assert not await service.fetchval("SELECT to_regclass('outbox_relay.outbox') IS NOT NULL"), (
            "`migrate --primary` touched the service database"
        )
    finally:
        await service.close()


async def test_subscribe_and_unsubscribe_twice(outbox_env: OutboxEnv, primary: Any, service: Any) -> None:
    """`subscribe` twice and `unsubscribe` twice all exit 0; the slot exists exactly while subscribed."""
    env = cli_env(outbox_env.env())
    await produce(primary, "before-subscribe")
    slot_sql = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1"
    name = outbox_env.subscription_name

    first = await cli("subscribe", env=env)
    assert first.returncode == 0, describe(first)
    assert await primary.fetchval(slot_sql, name) == 1, "no slot when `subscribe` returned"
    assert (
        await service.fetchval(
            "SELECT count(*) FROM outbox_relay.outbox WHERE correlation_id = 'before-subscribe'"
        )
        == 1
    ), "the rows already on the primary were not copied"
    second = await cli("subscribe", env=env)
    assert second.returncode == 0, describe(second)
    assert "already exists" in second.stdout, describe(second)

    await produce(primary, "after-subscribe")

    async def replicated() -> bool:
        return bool(
            await service.fetchval(
                "SELECT count(*) FROM outbox_relay.outbox WHERE correlation_id = 'after-subscribe'"
            )
        )

    await wait_until(replicated, message="a row replicated after `subscribe`")

    third = await cli("unsubscribe", env=env)
    assert third.returncode == 0, describe(third)
    assert await primary.fetchval(slot_sql, name) == 0, "the slot outlived `unsubscribe`"
    assert await service.fetchval("SELECT count(*) FROM pg_subscription WHERE subname = $1", name) == 0
    fourth = await cli("unsubscribe", env=env)
    assert fourth.returncode == 0, describe(fourth)
    assert "was not there" in fourth.stdout, describe(fourth)


# -- run, worker, status ----------------------------------------------------------------


async def test_run_and_worker_stop_cleanly_on_sigterm(outbox_env: OutboxEnv, services: Services) -> None:
    """`run` (active and standby) and `worker` exit 0 soon after SIGTERM, saying they stopped."""
    env = cli_env(outbox_env.env())
    # Several workers: a stop that races arq's Redis polling must end each of them.
    relay, standby, *workers = await services.start_fleet(
        env, relays=("relay", "standby"), workers=[f"worker-{i}" for i in range(4)]
    )
    for service in (relay, standby, *workers):
        service.proc.send_signal(signal.SIGTERM)
    for service in (relay, standby, *workers):
        assert await services.wait_exit(service, timeout=20) == 0, services.tails()
        assert "Traceback" not in service.text(), services.tails()
    assert relay.count("relay stopped") == 1, services.tails()
    for worker in workers:
        assert worker.count("worker stopped") == 1, services.tails()


async def test_worker_burst_exits_0_once_the_queue_is_empty(
    outbox_env: OutboxEnv, service: Any, services: Services
) -> None:
    """`worker --burst` applies every queued job, then exits 0 (and exits 0 at once on an empty queue)."""
    env = cli_env(outbox_env.env())
    empty = await cli("worker", "--burst", env=env)
    assert empty.returncode == 0, describe(empty)

    await open_account(service, "acc", 1_000)
    for i in range(20):
        await reserve(service, "acc", 10, f"b-{i}")
        await produce(service, f"b-{i}", "success" if i % 2 else "failure")
    await hand_over(services, env, service, 20)

    burst = await cli("worker", "--burst", env=env)
    assert burst.returncode == 0, describe(burst)
    assert await count_status(service, "finished") == 20, describe(burst)
    assert await service.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'") == 900


async def test_status_json_reports_counts_age_and_failed_rows(
    outbox_env: OutboxEnv, service: Any, services: Services
) -> None:
    """`status --json` prints one object with exactly the contract's keys and the right counts."""
    env = cli_env(outbox_env.env())
    await open_account(service, "acc", 1_000)
    for cid, outcome in (("ok-1", "success"), ("ok-2", "failure"), ("ok-3", "success")):
        await reserve(service, "acc", 10, cid)
        await produce(service, cid, outcome)
    await produce(service, "orphan-1", "success")  # no reservation: a permanent failure
    await produce(service, "weird-1", "success", kind="teleport")  # unknown kind: permanent too
    await hand_over(services, env, service, 5)
    burst = await cli("worker", "--burst", env=env)
    assert burst.returncode == 0, describe(burst)
    await produce(service, "late-1")  # no relay running: stays new

    result = await cli("status", "--json", env=env)
    assert result.returncode == 0, describe(result)
    assert len(result.stdout.strip().splitlines()) == 1, describe(result)
    report = json.loads(result.stdout)
    assert set(report) == {"counts", "oldest_pending_age_seconds", "failed"}
    assert report["counts"] == {"new": 1, "queued": 0, "finished": 3, "failed": 2}
    age = report["oldest_pending_age_seconds"]
    assert isinstance(age, int | float), describe(result)
    assert 0 <= age < 60
    failed = {row["correlation_id"]: row for row in report["failed"]}
    assert set(failed) == {"orphan-1", "weird-1"}
    for row in report["failed"]:
        assert set(row) == {"correlation_id", "kind", "attempts", "last_error", "errors"}
        assert row["attempts"] == 1
        assert [(e["attempt"], e["error"]) for e in row["errors"]] == [(1, row["last_error"])]
    assert failed["weird-1"]["kind"] == "teleport"
    assert "no reservation" in failed["orphan-1"]["last_error"]
    assert "unknown kind" in failed["weird-1"]["last_error"]

    text = await cli("status", env=env)
    assert text.returncode == 0, describe(text)
    assert "orphan-1" in text.stdout, describe(text)
    assert "weird-1" in text.stdout, describe(text)


async def test_status_shows_a_bidi_override_in_a_row_as_an_escape(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """Issue 15.5: a failed row whose correlation id and error hold U+202E (RIGHT-TO-LEFT OVERRIDE)
    and U+2066 is shown with them escaped by `status`; they never reach the terminal raw."""
    await make_failed(service, "invoice-\u202efdp.exe")
    await service.execute("UPDATE outbox_relay.outbox SET last_error = 'bad \u2066amount\u2069'")
    result = await cli("status", env=cli_env(outbox_env.env()))
    assert result.returncode == 0, describe(result)
    assert "invoice-\\u202efdp.exe" in result.stdout, describe(result)
    assert "error=bad \\u2066amount\\u2069" in result.stdout, describe(result)
    assert not {"\u202e", "\u2066", "\u2069"} & set(result.stdout), describe(result)


async def test_status_json_on_an_empty_outbox(outbox_env: OutboxEnv) -> None:
    """On an empty outbox `status --json` reports zero counts, no pending age and no failed rows."""
    result = await cli("status", "--json", env=cli_env(outbox_env.env()))
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout) == {
        "counts": {"new": 0, "queued": 0, "finished": 0, "failed": 0},
        "oldest_pending_age_seconds": None,
        "failed": [],
    }


# -- requeue --------------------------------------------------------------------------------


async def test_requeue_without_a_flag_is_a_usage_error(outbox_env: OutboxEnv) -> None:
    """`requeue` with neither --correlation-id nor --all-failed (or with both) exits 2 with one line."""
    env = cli_env(outbox_env.env())
    for args in (("requeue",), ("requeue", "--all-failed", "--correlation-id", "x")):
        result = await cli(*args, env=env)
        assert result.returncode == 2, describe(result)
        assert len(result.stderr.strip().splitlines()) == 1, describe(result)
        assert "Traceback" not in result.stderr


async def test_requeue_one_failed_row(outbox_env: OutboxEnv, service: Any) -> None:
    """`requeue --correlation-id` of a failed row prints "requeued 1 row" and resets it to new, attempts 0."""
    await make_failed(service, "f-1", "f-2")
    result = await cli("requeue", "--correlation-id", "f-1", env=cli_env(outbox_env.env()))
    assert result.returncode == 0, describe(result)
    assert result.stdout.strip() == "requeued 1 row", describe(result)
    rows = {
        r["correlation_id"]: tuple(r)[1:]
        for r in await service.fetch(
            "SELECT correlation_id, status, attempts, last_error FROM outbox_relay.outbox"
        )
    }
    assert rows == {"f-1": ("new", 0, None), "f-2": ("failed", 5, "boom")}


async def test_requeue_reports_ids_that_are_not_failed_rows(outbox_env: OutboxEnv, service: Any) -> None:
    """An id that is not a failed row (finished, or unknown) is reported and makes the exit code 1."""
    await make_failed(service, "f-1")
    await produce(service, "done-1")
    await service.execute(
        "UPDATE outbox_relay.outbox SET status = 'finished', attempts = 1, finished_at = now()"
        " WHERE correlation_id = 'done-1'"
    )
    env = cli_env(outbox_env.env())
    result = await cli(
        "requeue",
        *("--correlation-id", "f-1"),
        *("--correlation-id", "done-1"),
        *("--correlation-id", "nope"),
        env=env,
    )
    assert result.returncode == 1, describe(result)
    assert "requeued 1 row" in result.stdout, describe(result)
    assert "done-1" in result.stderr, describe(result)
    assert "nope" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr
    statuses = dict(await service.fetch("SELECT correlation_id, status FROM outbox_relay.outbox"))
    assert statuses == {"f-1": "new", "done-1": "finished"}

    alone = await cli("requeue", "--correlation-id", "nope", env=env)
    assert alone.returncode == 1, describe(alone)
    assert "nope" in alone.stderr, describe(alone)


async def test_requeue_all_failed_prints_the_count(outbox_env: OutboxEnv, service: Any) -> None:
    """`requeue --all-failed` puts every failed row back to new and prints how many; again: 0."""
    await make_failed(service, "f-1", "f-2", "f-3")
    await produce(service, "other")
    env = cli_env(outbox_env.env())
    result = await cli("requeue", "--all-failed", env=env)
    assert result.returncode == 0, describe(result)
    assert result.stdout.strip() == "requeued 3 rows", describe(result)
    assert await count_status(service, "new") == 4
    assert await service.fetchval("SELECT max(attempts) FROM outbox_relay.outbox") == 0
    again = await cli("requeue", "--all-failed", env=env)
    assert again.returncode == 0, describe(again)
    assert again.stdout.strip() == "requeued 0 rows", describe(again)


async def test_requeued_row_is_applied_at_once(
    outbox_env: OutboxEnv, service: Any, services: Services
) -> None:
    """A failed row, its cause fixed, is applied at once after `requeue` by the running services."""
    env = cli_env(outbox_env.env(sweep_interval="3600"))
    await open_account(service, "acc", 100)
    await produce(service, "early", "failure")  # its reservation comes only later
    relay = services.start("relay", "run", env=env)
    worker = services.start("worker", "worker", env=env)

    async def failed() -> bool:
        return await count_status(service, "failed") == 1

    await services.wait(failed, message="the row without a reservation failed")
    await reserve(service, "acc", 40, "early")
    result = await cli("requeue", "--correlation-id", "early", env=env)
    assert result.returncode == 0, describe(result)

    async def finished() -> bool:
        return await count_status(service, "finished") == 1

    await services.wait(finished, timeout=10, message="the requeued row finished")
    state = await service.fetchval("SELECT state FROM ledger.reservations WHERE correlation_id = 'early'")
    assert state == "reclaimed"
    assert await service.fetchval("SELECT balance FROM ledger.accounts WHERE id = 'acc'") == 100
    assert relay.running(), services.tails()
    assert worker.running(), services.tails()
