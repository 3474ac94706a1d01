"""Unbounded settings and bad URL ports exit 2 through the real CLI, naming the variable (issue 7, item 5)."""

from __future__ import annotations

import pytest

from tests.acceptance.test_cli import UNREACHABLE, assert_settings_error, cli, describe
from tests.conftest import OutboxEnv
from tests.helpers import cli_env, run_cli


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("run", "OUTBOX_RELAY_SWEEP_INTERVAL", "inf"),
        ("run", "OUTBOX_RELAY_REQUEUE_AFTER", "1e400"),
        ("run", "OUTBOX_RELAY_PRUNE_INTERVAL", "nan"),
        ("worker", "OUTBOX_RELAY_JOB_TIMEOUT", "1e12"),
        ("worker", "OUTBOX_RELAY_RETRY_BACKOFF_MAX", "inf"),
        ("worker", "OUTBOX_RELAY_WORKER_POLL_DELAY", "1e12"),
        ("worker", "OUTBOX_RELAY_WORKER_CONCURRENCY", "99999999999999999999999"),
        ("worker", "OUTBOX_RELAY_MAX_ATTEMPTS", "2147483648"),
        ("status", "OUTBOX_RELAY_DATABASE_URL", "postgresql://u@h:abc/db"),
        ("worker", "OUTBOX_RELAY_REDIS_URL", "redis://h:xx/0"),
    ],
)
async def test_unbounded_setting_exits_2_naming_the_variable(command: str, variable: str, value: str) -> None:
    """The command refuses the value before touching any server: exit 2, one stderr line naming it."""
    env = cli_env({**UNREACHABLE, variable: value})
    result = await cli(command, env=env, timeout=30)
    assert_settings_error(result, variable)


async def test_prune_older_than_1e12_is_a_usage_error() -> None:
    """`prune --older-than 1e12` exits 2 with a usage message, not 1 'timestamp out of range'."""
    result = await cli("prune", "--older-than", "1e12", env=cli_env(UNREACHABLE), timeout=30)
    assert result.returncode == 2, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, describe(result)
    assert "--older-than" in lines[0], describe(result)


@pytest.mark.parametrize(
    ("routes", "needle"),
    [
        ("ev.*=pigeon", "unknown sink 'pigeon'"),
        ("ev.*", "is not KIND_PATTERN=SINK"),
        # issue 15.6: a pattern given twice (the second never matches), a ROUTES too long to be meant
        ("ev.*=nats,audit=nats,ev.*=webhook", "pattern 'ev.*' appears twice"),
        (",".join(f"ev{i}.*=nats" for i in range(8000)), "at most 10,000 are allowed"),
        (",".join(f"e{i}=nats" for i in range(201)), "more than 200 entries"),
    ],
    ids=["unknown-sink", "malformed", "duplicate", "100k-chars", "201-entries"],
)
def test_worker_with_bad_routes_exits_2_naming_the_variable(routes: str, needle: str) -> None:
    """`worker` with an unknown sink or a malformed ROUTES entry exits 2, one line naming ROUTES."""
    env = cli_env(
        {
            "OUTBOX_RELAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "OUTBOX_RELAY_ROUTES": routes,
        }
    )
    result = run_cli("worker", env=env, timeout=30)
    assert result.returncode == 2
    assert "OUTBOX_RELAY_ROUTES" in result.stderr
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_empty_optional_urls_are_unset_through_the_cli(outbox_env: OutboxEnv) -> None:
    """Issue 15.6: ``OUTBOX_RELAY_PRIMARY_URL=`` and friends mean unset: `status` works (exit 0);
    a command needing the primary says it is required (exit 2), as the webhook sink says of its URL."""
    empty = {"OUTBOX_RELAY_PRIMARY_URL": "", "OUTBOX_RELAY_SUBSCRIPTION_CONNINFO": ""}
    env = cli_env({**outbox_env.env(), **empty})
    status = await cli("status", env=env, timeout=60)
    assert status.returncode == 0, describe(status)
    subscribe = await cli("subscribe", env=env, timeout=30)
    assert_settings_error(subscribe, "OUTBOX_RELAY_PRIMARY_URL")
    assert "is required" in subscribe.stderr, describe(subscribe)
    webhook = {"OUTBOX_RELAY_ROUTES": "ev.*=webhook", "OUTBOX_RELAY_WEBHOOK_URL": ""}
    worker = await cli("worker", env=cli_env({**UNREACHABLE, **webhook}), timeout=30)
    assert_settings_error(worker, "OUTBOX_RELAY_WEBHOOK_URL")
    assert "is required" in worker.stderr, describe(worker)
