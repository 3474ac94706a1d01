"""What a NOTIFY payload on the outbox channel means to the relay: a row id, a sweep, or noise.

A notification is a hint from anyone who can connect to the service database
(``pg_notify`` needs no grant), so its payload is untrusted: only the trigger's
``NEW.id::text`` (a positive ``bigint``: the outbox's identity column starts at
1, and the sweep only looks above 0) and ``requeue``'s ``sweep`` mean
something. Anything else is dropped and counted, never looked up: parsing is a
length check and a character-class check, bounded whatever the payload (NOTIFY
caps it at 8000 bytes anyway). A dropped notification costs no row anything:
the sweep finds every ``new`` row whether or not a notification brought it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: The payload `requeue` sends: sweep now.
SWEEP = "sweep"
#: PostgreSQL's largest ``bigint``, the outbox id's type.
MAX_ROW_ID = 2**63 - 1
_MAX_DIGITS = len(str(MAX_ROW_ID))
#: Seconds between two log lines about dropped notifications (each says how many since the last).
LOG_EVERY = 10.0
#: Characters of a dropped payload shown in the log line (escaped, so nothing reaches a terminal raw).
SAMPLE_CHARS = 32


def row_id(payload: str) -> int | None:
    """The row id ``payload`` names: ASCII digits making 1 to :data:`MAX_ROW_ID`; else None."""
    if not 0 < len(payload) <= _MAX_DIGITS or not (payload.isascii() and payload.isdigit()):
        return None
    value = int(payload)
    return value if 0 < value <= MAX_ROW_ID else None


def sample(payload: str) -> str:
    """A safe excerpt of ``payload`` for a log line: truncated, every non-ASCII or control
    character escaped (``ascii()``), its full length appended when cut."""
    shown = ascii(payload[:SAMPLE_CHARS])
    return shown if len(payload) <= SAMPLE_CHARS else f"{shown}...({len(payload)} chars)"


class DropLog:
    """Notifications dropped for one ``reason``: counted, and logged at most once per ``every`` seconds
    with the number dropped since the last line and a sample of the latest."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        every: float = LOG_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reason = reason
        self.message = message
        self.every = every
        self.clock = clock
        #: Dropped since start.
        self.total = 0
        self._unlogged = 0
        self._sample = ""
        self._logged_at = -float("inf")

    def dropped(self, payload: str) -> None:
        """One more dropped: log now if the last line is ``every`` seconds old."""
        self.total += 1
        self._unlogged += 1
        self._sample = payload
        self.flush()

    def flush(self) -> None:
        """Log what was dropped since the last line, if any and if that line is old enough."""
        if not self._unlogged or self.clock() - self._logged_at < self.every:
            return
        self._logged_at = self.clock()
        logger.warning(
            self.message,
            extra={
                "reason": self.reason,
                "dropped": self._unlogged,
                "dropped_total": self.total,
                "sample": sample(self._sample),
            },
        )
        self._unlogged = 0
