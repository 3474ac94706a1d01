"""retry: a permission error is not a reachability problem (issue 7, item 6)."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import pytest

from outbox_relay.exceptions import UnavailableError
from outbox_relay.retry import Backoff, is_denied, retry, why_failed

logger = logging.getLogger("test.backoff")


def _denied() -> asyncpg.InsufficientPrivilegeError:
    return asyncpg.InsufficientPrivilegeError("permission denied for database svc")


def test_is_denied_tells_permission_from_reachability() -> None:
    """asyncpg's privilege and authentication errors are denials; OSError and timeouts are not."""
    assert is_denied(_denied())
    assert is_denied(asyncpg.InvalidAuthorizationSpecificationError("role x is not permitted to log in"))
    assert is_denied(asyncpg.InvalidPasswordError("password authentication failed"))
    assert not is_denied(OSError("connection refused"))
    assert not is_denied(TimeoutError())
    assert why_failed(_denied(), "the primary") == "permission denied for the primary"
    assert why_failed(OSError(), "the primary") == "cannot reach the primary"


async def test_one_off_retry_gives_up_at_once_on_permission_denied() -> None:
    """With a give-up window, a denial raises UnavailableError on the first attempt, saying so."""
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise _denied()

    started = time.monotonic()
    with pytest.raises(UnavailableError, match="permission denied for the service database"):
        await retry(attempt, what="the service database", logger=logger, give_up_after=8.0)
    assert calls == 1
    assert time.monotonic() - started < 1.0


async def test_service_retry_logs_permission_denied_plainly(caplog: pytest.LogCaptureFixture) -> None:
    """A service (no give-up window) keeps retrying, and logs 'permission denied for', not 'cannot reach'."""
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise _denied()
        return "granted"

    with caplog.at_level(logging.WARNING, logger="test.backoff"):
        result = await retry(
            attempt,
            what="the service database",
            logger=logger,
            give_up_after=None,
            backoff=Backoff(0.001, 0.002),
            stop=asyncio.Event(),
        )
    assert result == "granted"
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["permission denied for the service database, retrying"] * 2


def test_backoff_survives_thousands_of_attempts() -> None:
    """A service retrying for hours never overflows the doubling (2.0**1024 would)."""
    backoff = Backoff(0.2, 5.0)
    delays = [backoff.next_delay() for _ in range(2000)]
    assert max(delays) <= 5.0 * 1.2


async def test_a_database_that_does_not_exist_ends_a_one_off_retry_at_once_and_is_named() -> None:
    """Issue 15.6: InvalidCatalogNameError (3D000) fails a one-off retry at first try, saying the
    database does not exist (with its name), not "cannot reach"."""
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise asyncpg.InvalidCatalogNameError('database "svc_x" does not exist')

    with pytest.raises(UnavailableError) as caught:
        await retry(attempt, what="the service database", logger=logger, give_up_after=8.0)
    assert calls == 1
    assert str(caught.value).startswith("the service database does not exist: ")
    assert 'database "svc_x" does not exist' in str(caught.value)
