"""Operator commands on the service database: `status` and `requeue`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from outbox_relay.db import Connection
from outbox_relay.sql import query

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
            lines += [
                f"  {f.correlation_id}  kind={f.kind}  attempts={f.attempts}  error={f.last_error}"
                for f in self.failed
            ]
        return "\n".join(lines)


async def status(conn: Connection) -> Status:
    """Read the outbox's status (one consistent snapshot)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        counts = dict.fromkeys(STATUSES, 0)
        for record in await conn.fetch(query("status_counts")):
            counts[record["status"]] = int(record["n"])
        age = await conn.fetchval(query("oldest_pending_age"))
        failed = [
            FailedRow(r["correlation_id"], r["kind"], r["attempts"], r["last_error"])
            for r in await conn.fetch(query("failed_rows"), MAX_FAILED_LISTED)
        ]
    return Status(counts, None if age is None else max(0.0, float(age)), failed)


@dataclass(frozen=True)
class RequeueResult:
    """How many rows went back to ``new``, and the ids that were not failed rows."""

    requeued: int
    not_failed: list[str]


async def requeue(
    conn: Connection, *, correlation_ids: list[str] | None = None, all_failed: bool = False
) -> RequeueResult:
    """Put failed rows back to ``new`` (attempts reset) and wake the relay at once."""
    async with conn.transaction():
        if all_failed:
            count = int(await conn.fetchval(query("requeue_all_failed")))
            missing: list[str] = []
        else:
            wanted = list(dict.fromkeys(correlation_ids or []))
            done = {r["correlation_id"] for r in await conn.fetch(query("requeue_ids"), wanted)}
            count = len(done)
            missing = [cid for cid in wanted if cid not in done]
        if count:
            await conn.execute(query("wake_relay"))
    return RequeueResult(count, missing)
