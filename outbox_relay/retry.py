"""Capped exponential backoff with jitter, and a retry loop that logs one line per attempt."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from outbox_relay.exceptions import MigrationError, UnavailableError
from outbox_relay.lifecycle import stopped_within
from outbox_relay.logs import describe

T = TypeVar("T")


class Backoff:
    """Delays of ``initial * 2**n`` seconds, capped at ``maximum``, each with ±20 % jitter.

    The default is the services' (reconnecting to a database or a queue server): 0.2 s doubling to 5 s.
    """

    def __init__(self, initial: float = 0.2, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt (and count this one)."""
        # The exponent is capped: a service retrying for hours would overflow 2.0**n past n = 1023.
        delay = min(self.maximum, self.initial * 2.0 ** min(self.attempt, 64))
        self.attempt += 1
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto

    def reset(self) -> None:
        """Start again from ``initial`` (after a success)."""
        self.attempt = 0


#: SQLSTATE classes that no retry cures by itself: insufficient privilege (42501),
#: failed authentication (28000, 28P01). Checked by code, not class, so that this
#: module stays free of any driver.
_DENIED_SQLSTATES = frozenset({"42501", "28000", "28P01"})


#: SQLSTATE of a database that does not exist (invalid_catalog_name): a one-off command fails
#: at once; a service keeps retrying (the database may be created later), saying so.
_MISSING_DATABASE = "3D000"


def is_denied(exc: BaseException) -> bool:
    """True for a permission or authentication error: the server answered, and said no."""
    return getattr(exc, "sqlstate", None) in _DENIED_SQLSTATES


def is_missing_database(exc: BaseException) -> bool:
    """True when the server answered that the database asked for does not exist."""
    return getattr(exc, "sqlstate", None) == _MISSING_DATABASE


def why_failed(exc: BaseException, what: str) -> str:
    """``permission denied for <what>``, ``<what> does not exist``, ``<what> needs `outbox-relay
    migrate``` or ``cannot reach <what>``, as the error says."""
    if is_denied(exc):
        return f"permission denied for {what}"
    if is_missing_database(exc):
        return f"{what} does not exist"
    if isinstance(exc, MigrationError):  # reached, but its schema is behind this code
        return f"{what} needs `outbox-relay migrate`"
    return f"cannot reach {what}"


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    logger: logging.Logger,
    give_up_after: float | None,
    stop: asyncio.Event | None = None,
    backoff: Backoff | None = None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> T:
    """Run ``operation`` until it succeeds.

    Services pass ``give_up_after=None`` and retry forever with capped backoff;
    one-off commands pass a few seconds and get an :class:`UnavailableError`
    (at once for a permission or authentication error, see :func:`is_denied`, or a
    database that does not exist).
    Each failed attempt logs one plain line (no traceback). When ``stop`` is
    set while waiting, :class:`asyncio.CancelledError` is raised.
    """
    backoff = backoff or Backoff()
    deadline = None if give_up_after is None else time.monotonic() + give_up_after
    while True:
        try:
            return await operation()
        except retry_on as exc:
            delay = backoff.next_delay()
            # A one-off command denied access, or asking for a database that does not exist,
            # fails at once: waiting will not grant it.
            final = is_denied(exc) or is_missing_database(exc)
            if deadline is not None and (final or time.monotonic() + delay > deadline):
                raise UnavailableError(f"{why_failed(exc, what)}: {describe(exc)}") from None
            logger.warning(
                "%s, retrying",
                why_failed(exc, what),
                extra={"error": describe(exc), "retry_in": round(delay, 2), "attempt": backoff.attempt},
            )
        if stop is None:
            await asyncio.sleep(delay)
        elif await stopped_within(stop, delay):
            raise asyncio.CancelledError
