"""Commands pointed at the wrong database, hostile row text, permission errors (issue 7, item 6)."""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from outbox_relay.db import quote_ident
from tests.acceptance.test_cli import cli, describe
from tests.conftest import OutboxEnv
from tests.helpers import Services, cli_env


async def test_migrate_primary_on_a_service_database_says_which_command_was_meant(
    outbox_env: OutboxEnv,
) -> None:
    """`migrate --primary` with PRIMARY_URL at a service database exits 1 naming the mix-up, no raw error."""
    env = cli_env(outbox_env.env(PRIMARY_URL=outbox_env.service_url))
    result = await cli("migrate", "--primary", env=env)
    assert result.returncode == 1, describe(result)
    assert "service database's schema" in result.stderr, describe(result)
    assert "OUTBOX_RELAY_PRIMARY_URL" in result.stderr, describe(result)
    assert "DuplicateTable" not in result.stderr, describe(result)
    assert "Traceback" not in result.stderr


async def test_status_on_a_primary_says_which_command_was_meant(outbox_env: OutboxEnv) -> None:
    """`status` with DATABASE_URL at the primary exits 1 saying it is the primary, no UndefinedColumnError."""
    env = cli_env(outbox_env.env(DATABASE_URL=outbox_env.primary_url))
    result = await cli("status", env=env)
    assert result.returncode == 1, describe(result)
    assert "primary's producer schema" in result.stderr, describe(result)
    assert "migrate --primary" in result.stderr, describe(result)
    assert "UndefinedColumn" not in result.stderr, describe(result)


async def test_migrate_on_a_primary_says_which_command_was_meant(outbox_env: OutboxEnv) -> None:
    """`migrate` (service) with DATABASE_URL at the primary exits 1 instead of half-applying."""
    env = cli_env(outbox_env.env(DATABASE_URL=outbox_env.primary_url))
    result = await cli("migrate", env=env)
    assert result.returncode == 1, describe(result)
    assert "OUTBOX_RELAY_DATABASE_URL" in result.stderr, describe(result)


async def test_status_text_escapes_control_characters_from_rows(outbox_env: OutboxEnv, service: Any) -> None:
    """A failed row whose id, kind and error hold ESC sequences and newlines prints as one escaped line."""
    await service.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, kind, status, attempts, last_error, finished_at)"
        " VALUES ($1, $2, 'failed', 1, $3, now())",
        "evil\x1b[2J\x1b[Hid\nfailed rows: none",
        "k\x1b]0;pwned\x07",
        "boom\r\n\x9b31mred",
    )
    result = await cli("status", env=cli_env(outbox_env.env()))
    assert result.returncode == 0, describe(result)
    assert "\x1b" not in result.stdout
    assert "\x9b" not in result.stdout
    assert "\x07" not in result.stdout
    assert "\r" not in result.stdout
    lines = result.stdout.splitlines()
    assert (
        "  evil\\x1b[2J\\x1b[Hid\\nfailed rows: none  kind=k\\x1b]0;pwned\\x07  attempts=1  failures=0  "
        "error=boom\\r\\n\\x9b31mred" in lines
    ), describe(result)
    assert sum(line.startswith("failed rows") for line in lines) == 1, describe(result)


async def test_permission_denied_fails_at_once_and_says_so(outbox_env: OutboxEnv, service: Any) -> None:
    """A user refused CONNECT gets exit 1 well within the 8 s retry window, saying 'permission denied for'."""
    role = f"denied_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(outbox_env.pg.url("postgres"))
    try:
        await admin.execute(f"CREATE ROLE {quote_ident(role)} LOGIN")
        await admin.execute(f"REVOKE CONNECT ON DATABASE {quote_ident(outbox_env.service_db)} FROM PUBLIC")
        parts = urlsplit(outbox_env.service_url)
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{role}@{host}"))
        started = time.monotonic()
        result = await cli("status", env=cli_env(outbox_env.env(DATABASE_URL=url)))
        elapsed = time.monotonic() - started
    finally:
        await admin.execute(f"GRANT CONNECT ON DATABASE {quote_ident(outbox_env.service_db)} TO PUBLIC")
        await admin.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
        await admin.close()
    assert result.returncode == 1, describe(result)
    assert "permission denied for the service database" in result.stderr, describe(result)
    assert "cannot reach" not in result.stderr, describe(result)
    assert elapsed < 6.0, f"took {elapsed:.1f} s: it retried instead of failing at once"


@pytest.mark.parametrize(
    "command",
    [("status",), ("migrate",), ("requeue", "--all-failed"), ("doctor",), ("prune", "--older-than", "60")],
    ids=lambda c: c[0],
)
async def test_a_one_off_command_on_a_database_that_does_not_exist_fails_at_once_naming_it(
    outbox_env: OutboxEnv, command: tuple[str, ...]
) -> None:
    """Issue 15.6: no 8 s of "cannot reach" retries: exit 1 within a few seconds, naming the database."""
    missing = f"nowhere_{uuid.uuid4().hex[:8]}"
    env = cli_env(outbox_env.env(DATABASE_URL=outbox_env.pg.url(missing)))
    started = time.monotonic()
    result = await cli(*command, env=env)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr  # `doctor` says it in its report, the others on stderr
    assert result.returncode == 1, describe(result)
    assert f'database "{missing}" does not exist' in output, describe(result)
    assert "cannot reach" not in output, describe(result)
    assert elapsed < 5, f"took {elapsed:.1f} s\n{describe(result)}"


async def test_run_waits_for_a_database_that_does_not_exist_yet_saying_so(
    outbox_env: OutboxEnv, services: Services
) -> None:
    """`run` keeps retrying a database that does not exist (it may be created later), logging that it
    does not exist and its name; once created and migrated, the relay becomes active."""
    missing = f"later_{uuid.uuid4().hex[:8]}"
    env = cli_env(outbox_env.env(DATABASE_URL=outbox_env.pg.url(missing)))
    relay = services.start_relay("relay", env)
    await services.wait_logged(relay, f'database \\"{missing}\\" does not exist', count=2)
    assert relay.count("the service database does not exist, retrying") >= 2, relay.text()
    admin = await asyncpg.connect(outbox_env.pg.url("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(missing)}")
        migrated = await cli("migrate", env=env)
        assert migrated.returncode == 0, describe(migrated)
        await services.ready(relay, role="active")
    finally:
        services.kill_all()
        await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(missing)} WITH (FORCE)")
        await admin.close()
