"""Operator commands on the service database: `status` and `requeue`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from outbox_relay.db import Connection
from outbox_relay.exceptions import MigrationError
from outbox_relay.sql import query
from outbox_relay.terminal import escape_controls

STATUSES = ("new", "queued", "finished", "failed")
#: `status` lists at most this many failed rows.
MAX_FAILED_LISTED = 100


@dataclass(frozen=True)
class FailedRow:
    """A quarantined row and why."""

    correlation_id: str
    kind: str
    attempts: int
    last_error: str | None
    #: The failure history: the last 10 failed attempts, oldest first, each {"at", "attempt", "error"}.
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Status:
    """Counts per status, the oldest pending row's age, the failed rows."""

    counts: dict[str, int]
    oldest_pending_age_seconds: float | None
    failed: list[FailedRow] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The `status --json` object of the contract."""
        return {
            "counts": self.counts,
            "oldest_pending_age_seconds": self.oldest_pending_age_seconds,
            "failed": [
                {
                    "correlation_id": f.correlation_id,
                    "kind": f.kind,
                    "attempts": f.attempts,
                    "last_error": f.last_error,
                    "errors": f.errors,
                }
                for f in self.failed
            ],
        }

    def as_text(self) -> str:
        """A short report for people."""
        lines = ["status    rows"]
        lines += [f"{name:<9} {self.counts[name]}" for name in STATUSES]
        age = self.oldest_pending_age_seconds
        lines.append("oldest pending: " + ("none" if age is None else f"{age:.1f} s"))
        if self.failed:
            total = self.counts["failed"]
            shown = f" (first {len(self.failed)} of {total})" if total > len(self.failed) else ""
            lines.append(f"failed rows{shown}:")
            # Values from rows are escaped: an id holding ESC or a newline must not reach the terminal.
            lines += [
                f"  {escape_controls(f.correlation_id)}  kind={escape_controls(f.kind)}  "
                f"attempts={f.attempts}  failures={len(f.errors)}  "
                f"error={escape_controls(str(_last_error(f)))}"
                for f in self.failed
            ]
        return "\n".join(lines)


def _last_error(row: FailedRow) -> str | None:
    """The newest error of the history, else ``last_error`` (a row failed before the history existed)."""
    if row.errors:
        return str(row.errors[-1].get("error"))
    return row.last_error


def failed_row(record: Any) -> FailedRow:
    """A :class:`FailedRow` from a ``failed_rows`` record (``errors`` comes as JSON text)."""
    errors = json.loads(record["errors"]) if record["errors"] else []
    return FailedRow(
        record["correlation_id"], record["kind"], record["attempts"], record["last_error"], errors
    )


Shape = Literal["service", "primary", "none"]


async def database_shape(conn: Connection) -> Shape:
    """What this database holds: the service schema, the primary's producer schema, or neither."""
    row = await conn.fetchrow(query("database_shape"))
    assert row is not None
    if row["has_status"]:
        return "service"
    return "primary" if row["has_outbox"] else "none"


async def require_shape(conn: Connection, wanted: Literal["service", "primary"], command: str) -> None:
    """Raise a :class:`MigrationError` saying which command was meant when ``conn`` is the wrong database.

    ``migrate --primary`` on a service database, or ``status`` on a primary,
    would otherwise fail with a raw DuplicateTableError / UndefinedColumnError.
    A database with no outbox at all passes when ``wanted`` is what ``command``
    would create (``migrate``); the caller's own check reports the rest.
    """
    shape = await database_shape(conn)
    if shape == wanted or shape == "none":
        return
    if shape == "service":
        raise MigrationError(
            f"this database holds the service database's schema (an outbox with tracking columns), "
            f"not the primary's: `{command}` needs the primary here (check OUTBOX_RELAY_PRIMARY_URL); "
            f"this database takes `migrate`, `status`, `run` and `worker`"
        )
    raise MigrationError(
        f"this database holds the primary's producer schema (an outbox without tracking columns), "
        f"not the service database's: `{command}` needs the service database here (check "
        f"OUTBOX_RELAY_DATABASE_URL: does it point at the primary?); this database takes `migrate --primary`"
    )


async def status(conn: Connection) -> Status:
    """Read the outbox's status (one consistent snapshot)."""
    await require_shape(conn, "service", "status")
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        counts = dict.fromkeys(STATUSES, 0)
        for record in await conn.fetch(query("status_counts")):
            counts[record["status"]] = int(record["n"])
        age = await conn.fetchval(query("oldest_pending_age"))
        failed = [failed_row(r) for r in await conn.fetch(query("failed_rows"), MAX_FAILED_LISTED)]
    return Status(counts, None if age is None else max(0.0, float(age)), failed)


@dataclass(frozen=True)
class RequeueResult:
    """How many rows went back to ``new``, and the ids that were not failed rows."""

    requeued: int
    not_failed: list[str]


async def requeue(
    conn: Connection,
    *,
    correlation_ids: list[str] | None = None,
    all_failed: bool = False,
    requeue_after: float | None = None,
) -> RequeueResult:
    """Put failed rows back to ``new`` (attempts reset) and wake the relay at once.

    With ``requeue_after`` (REQUEUE_AFTER), a named row ``queued`` for longer
    than that goes back to ``new`` too, under a new generation: it gets a new
    job id, whatever the queue holds under its old one (contract section 3).
    """
    await require_shape(conn, "service", "requeue")
    async with conn.transaction():
        if all_failed:
            count = int(await conn.fetchval(query("requeue_all_failed")))
            missing: list[str] = []
        else:
            wanted = list(dict.fromkeys(correlation_ids or []))
            done = {r["correlation_id"] for r in await conn.fetch(query("requeue_ids"), wanted)}
            if requeue_after is not None and len(done) < len(wanted):
                rest = [cid for cid in wanted if cid not in done]
                stale = await conn.fetch(query("requeue_stale_ids"), rest, requeue_after)
                done.update(r["correlation_id"] for r in stale)
            count = len(done)
            missing = [cid for cid in wanted if cid not in done]
        if count:
            await conn.execute(query("wake_relay"))
    return RequeueResult(count, missing)
