"""`doctor`: check a deployment end to end, one line per check (contract section 3).

Each check says ``ok``, ``warn`` or ``fail``, what it found and, when not ok,
the fix: the SQL or the command. It reads, never writes. The queries are in
``doctor.sql``; Redis is read through the queue adapter
(:func:`outbox_relay.arq_adapter.redis_facts`).

How "one live worker" is told: arq workers refresh a health-check key per
queue (``<queue>:health-check``, TTL 61 s, refreshed every 60 s by each
worker's loop), the signal that a worker is *consuming this queue*. The
workers' database sessions (``application_name = 'outbox_relay.worker'``) are
reported alongside but decide nothing on their own: a worker's pool closes
idle connections after a minute, and the sessions do not name the queue.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from outbox_relay.db import Connection, DirectConnection, connect, quote_ident
from outbox_relay.handlers import Plugin
from outbox_relay.logs import describe
from outbox_relay.migrate import migration_sets
from outbox_relay.sql import QueryFile, query
from outbox_relay.terminal import escape_controls

_SQL = QueryFile(Path(__file__).resolve().parent / "doctor.sql")

Level = Literal["ok", "warn", "fail"]

#: Thresholds (documented in the README's "Operating it").
SLOT_LAG_WARN_BYTES = 1 << 30  # 1 GiB of WAL the slot has not confirmed
RECEIPT_AGE_WARN = 120.0  # s without a message from the primary (keepalives come every ~30 s)
NOTIFY_QUEUE_WARN, NOTIFY_QUEUE_FAIL = 0.10, 0.50  # fraction of the 8 GB notification queue
OLD_XACT_WARN, OLD_XACT_FAIL = 300.0, 3600.0  # s a snapshot has been held back
PENDING_FAIL_FACTOR = 5  # oldest pending older than 5 x REQUEUE_AFTER fails
DEAD_TUPLES_MIN = 100_000  # dead tuples worth a warning at all...
DEAD_TUPLES_RATIO = 0.5  # ...when also more than half the live ones


@dataclass(frozen=True)
class DoctorConfig:
    """What doctor needs of the settings (built once by the CLI). URLs are secrets."""

    database_url: str
    redis_url: str
    queue_name: str
    requeue_after: float
    primary_url: str | None = None
    subscription_name: str | None = None
    plugins: Sequence[Plugin] = ()

    def __repr__(self) -> str:
        return f"DoctorConfig(queue_name={self.queue_name!r}, requeue_after={self.requeue_after})"


@dataclass(frozen=True)
class Check:
    """One finding."""

    name: str
    status: Level
    detail: str
    fix: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}

    def as_text(self) -> str:
        """``ok    name: detail``, and for anything not ok ``  fix: …`` on the same line, escaped."""
        line = f"{self.status:<5} {escape_controls(self.name)}: {escape_controls(self.detail)}"
        if self.status != "ok" and self.fix:
            line += f"  fix: {escape_controls(self.fix)}"
        return line


@dataclass
class Report:
    """Every check, in the order made."""

    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: Level, detail: str, fix: str | None = None) -> None:
        self.checks.append(Check(name, status, detail, fix if status != "ok" else None))

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {"checks": [c.as_json() for c in self.checks]}

    def as_text(self) -> str:
        return "\n".join(c.as_text() for c in self.checks)

    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@dataclass(frozen=True)
class _Subscription:
    oid: int
    name: str
    enabled: bool
    slot: str | None
    streaming: str | None


async def run_doctor(config: DoctorConfig) -> Report:
    """Make every check; never raises for what it finds (a failure to connect is a check too)."""
    report = Report()
    service = await _connect(report, "service database", config.database_url)
    subscription: _Subscription | None = None
    worker_sessions: int | None = None
    if service is not None:
        try:
            if await _service_checks(report, service, config):
                subscription = await _subscription_checks(report, service, config)
                worker_sessions = await _relay_check(report, service)
        finally:
            await service.close()
    if config.primary_url is not None:
        await _primary_checks(report, config.primary_url, subscription)
    await _queue_checks(report, config, worker_sessions)
    return report


async def _connect(report: Report, label: str, url: str) -> DirectConnection | None:
    try:
        return await connect(url, application_name="outbox_relay.doctor")
    except Exception as exc:  # whatever it is, it is this check's finding
        env = "OUTBOX_RELAY_PRIMARY_URL" if label == "primary" else "OUTBOX_RELAY_DATABASE_URL"
        report.add(
            label, "fail", f"cannot connect: {describe(exc)}", f"check {env} and that the server is up"
        )
        return None


# -- the service database -----------------------------------------------------------------


async def _service_checks(report: Report, conn: Connection, config: DoctorConfig) -> bool:
    """Schema, trigger, rows, statistics. False when the database is not a service database."""
    from outbox_relay.admin import database_shape

    server = await conn.fetchrow(_SQL("server"))
    assert server is not None
    shape = await database_shape(conn)
    if shape != "service":
        found = "the primary's producer schema" if shape == "primary" else "no outbox_relay schema"
        fix = (
            "point OUTBOX_RELAY_DATABASE_URL at the service database"
            if shape == "primary"
            else "outbox-relay migrate"
        )
        report.add("service database", "fail", f"{server['database']} holds {found}", fix)
        return False
    report.add("service database", "ok", f"{server['database']}, PostgreSQL {server['version']}")
    await _schema_checks(report, conn, config.plugins)
    await _trigger_check(report, conn, config)
    await _rows_checks(report, conn, config)
    await _maintenance_checks(report, conn)
    return True


async def _schema_checks(report: Report, conn: Connection, plugins: Sequence[Plugin]) -> None:
    if not await conn.fetchval(query("migrations_table_exists")):
        report.add("schema", "fail", "no outbox_relay.schema_migrations", "outbox-relay migrate")
        return
    for mset in migration_sets("service", plugins):
        current = int(await conn.fetchval(query("schema_version"), mset.target))
        name = f"schema {mset.target}"
        if current < mset.latest:
            report.add(
                name, "fail", f"version {current}, this code needs {mset.latest}", "outbox-relay migrate"
            )
        elif current > mset.latest:
            report.add(
                name,
                "fail",
                f"version {current}, newer than this code's {mset.latest}",
                "run the outbox_relay release that migrated it (or newer)",
            )
        else:
            report.add(name, "ok", f"version {current}")


async def _trigger_check(report: Report, conn: Connection, config: DoctorConfig) -> None:
    enabled = await conn.fetchval(_SQL("notify_trigger"))
    always = "ALTER TABLE outbox_relay.outbox ENABLE ALWAYS TRIGGER outbox_notify;"
    if enabled is None:
        report.add("notify trigger", "fail", "outbox_notify is missing", "outbox-relay migrate")
    elif enabled == "A":
        report.add("notify trigger", "ok", "outbox_notify ENABLE ALWAYS")
    else:
        meaning = {
            "D": "disabled: no row wakes the relay, every row waits for the sweep",
            "O": "enabled for local rows only: replicated rows never wake the relay",
            "R": "enabled for replicated rows only: rows written here never wake the relay",
        }.get(str(enabled), f"in state {enabled!r}")
        report.add("notify trigger", "fail", f"outbox_notify {meaning}", always)


async def _rows_checks(report: Report, conn: Connection, config: DoctorConfig) -> None:
    age = await conn.fetchval(query("oldest_pending_age"))
    limit = config.requeue_after
    fix = (
        "see `outbox-relay status`; check the relay and worker lines here; start more workers "
        "(`outbox-relay worker`)"
    )
    if age is None:
        report.add("oldest pending", "ok", "no pending row")
    else:
        age = max(0.0, float(age))
        found = f"{_seconds(age)} old (REQUEUE_AFTER {_seconds(limit)})"
        if age > PENDING_FAIL_FACTOR * limit:
            report.add("oldest pending", "fail", found, fix)
        elif age > limit:
            report.add("oldest pending", "warn", found, fix)
        else:
            report.add("oldest pending", "ok", found)
    failed = int(await conn.fetchval(_SQL("failed_count")))
    if failed:
        report.add(
            "failed rows",
            "warn",
            f"{failed} row{'s' if failed != 1 else ''} failed",
            "see their errors with `outbox-relay status`; after the cause is fixed: "
            "`outbox-relay requeue --all-failed`",
        )
    else:
        report.add("failed rows", "ok", "none")


async def _maintenance_checks(report: Report, conn: Connection) -> None:
    usage = float(await conn.fetchval(_SQL("notification_queue")))
    found = f"{usage * 100:.2f} % of the queue used"
    fix = (
        "a listening session inside a long transaction blocks its cleanup: find it with "
        "SELECT pid, xact_start, query FROM pg_stat_activity WHERE xact_start < now() - interval '5 min'; "
        "then SELECT pg_terminate_backend(pid);"
    )
    level: Level = "fail" if usage >= NOTIFY_QUEUE_FAIL else "warn" if usage >= NOTIFY_QUEUE_WARN else "ok"
    report.add("notification queue", level, found, fix)

    tuples = await conn.fetchrow(_SQL("outbox_tuples"))
    if tuples is not None:
        live, dead = int(tuples["live"]), int(tuples["dead"])
        ago = tuples["vacuumed_ago"]
        found = f"{dead} dead / {live} live tuples, vacuumed " + (
            "never" if ago is None else f"{_seconds(float(ago))} ago"
        )
        if dead >= DEAD_TUPLES_MIN and dead > DEAD_TUPLES_RATIO * live:
            report.add(
                "outbox dead tuples",
                "warn",
                found,
                "VACUUM (VERBOSE) outbox_relay.outbox; if it removes little, an old transaction "
                "holds it back (see the xmin line)",
            )
        else:
            report.add("outbox dead tuples", "ok", found)

    oldest = await conn.fetchrow(_SQL("oldest_xmin"))
    if oldest is None or oldest["xact_seconds"] is None:
        report.add("xmin horizon", "ok", "no transaction holds back vacuum")
        return
    seconds = float(oldest["xact_seconds"])
    found = (
        f"pid {oldest['pid']} ({oldest['application_name'] or 'no application_name'}, "
        f"{oldest['state']}) holds a snapshot {oldest['xmin_age']} transactions old, "
        f"its transaction open for {_seconds(seconds)}"
    )
    fix = (
        f"SELECT pg_terminate_backend({oldest['pid']}); and set idle_in_transaction_session_timeout "
        "for the role that left it open"
    )
    level = "fail" if seconds >= OLD_XACT_FAIL else "warn" if seconds >= OLD_XACT_WARN else "ok"
    report.add("xmin horizon", level, found, fix)


# -- replication ---------------------------------------------------------------------------------


async def _subscription_checks(
    report: Report, conn: Connection, config: DoctorConfig
) -> _Subscription | None:
    rows = await conn.fetch(_SQL("subscriptions"), config.subscription_name)
    if not rows:
        if config.subscription_name is not None:
            report.add(
                "subscription",
                "fail",
                f"no subscription {config.subscription_name} in this database",
                "outbox-relay subscribe",
            )
        elif config.primary_url is not None:
            report.add(
                "subscription",
                "fail",
                "PRIMARY_URL is set but this database subscribes to no outbox publication",
                "outbox-relay subscribe",
            )
        else:
            report.add("subscription", "ok", "none: the direct shape (rows are written here)")
        return None
    if len(rows) > 1:
        names = ", ".join(r["name"] for r in rows)
        report.add(
            "subscription",
            "fail",
            f"several subscriptions to the outbox publication: {names}",
            "set OUTBOX_RELAY_SUBSCRIPTION_NAME to the one in use; drop the others",
        )
        return None
    row = rows[0]
    sub = _Subscription(int(row["oid"]), row["name"], row["enabled"], row["slot"], row["streaming"])
    ident = quote_ident(sub.name)
    if not sub.enabled:
        report.add("subscription", "fail", f"{sub.name} is disabled", f"ALTER SUBSCRIPTION {ident} ENABLE;")
    elif sub.slot is None:
        report.add(
            "subscription",
            "fail",
            f"{sub.name} has no slot (slot_name = NONE)",
            "outbox-relay unsubscribe && outbox-relay subscribe",
        )
    else:
        report.add("subscription", "ok", f"{sub.name} enabled, slot {sub.slot}")

    worker = await conn.fetchrow(_SQL("apply_worker"), sub.oid)
    if worker is None or worker["pid"] is None:
        level: Level = "fail"
        fix = (
            f"ALTER SUBSCRIPTION {ident} ENABLE;"
            if not sub.enabled
            else "see the service database server's log for the apply worker's error "
            "(max_logical_replication_workers reached, primary unreachable, slot missing)"
        )
        report.add("apply worker", level, "not running", fix)
    else:
        receipt = worker["receipt_age"]
        heard = (
            "never heard from the primary"
            if receipt is None
            else (f"last heard from the primary {_seconds(float(receipt))} ago")
        )
        lag = worker["lag_seconds"]
        lag_text = "" if lag is None else f", lag {_seconds(max(0.0, float(lag)))}"
        if receipt is not None and float(receipt) > RECEIPT_AGE_WARN:
            report.add(
                "apply worker",
                "warn",
                f"pid {worker['pid']}, {heard}{lag_text}",
                "check the primary is reachable from the service database's server",
            )
        else:
            report.add("apply worker", "ok", f"pid {worker['pid']}, {heard}{lag_text}")
    running = worker is not None and worker["pid"] is not None

    tables = await conn.fetch(_SQL("subscription_tables"), sub.oid)
    not_ready = [f"{t['relation']} ({t['state']})" for t in tables if t["state"] != "r"]
    if not tables:
        report.add(
            "subscription tables",
            "fail",
            "the subscription replicates no table",
            f"check the primary's publication, then ALTER SUBSCRIPTION {ident} REFRESH PUBLICATION;",
        )
    elif not_ready:
        report.add(
            "subscription tables",
            "warn" if running else "fail",
            "not ready: " + ", ".join(not_ready) + " (i/d: initial copy, f/s: catching up)",
            "wait for the initial copy; if it does not move, see the server log for sync errors",
        )
    else:
        report.add("subscription tables", "ok", f"{len(tables)} ready")

    errors = await conn.fetchrow(_SQL("subscription_errors"), sub.oid)
    if errors is not None:
        apply_errors, sync_errors = int(errors["apply_errors"]), int(errors["sync_errors"])
        found = f"{apply_errors} apply errors, {sync_errors} sync errors"
        if apply_errors or sync_errors:
            recovered = running and not not_ready
            report.add(
                "subscription errors",
                "warn" if recovered else "fail",
                found + (" (counted earlier; replication runs now)" if recovered else ""),
                "read the error in the service database server's log; a change that can never apply: "
                f"ALTER SUBSCRIPTION {ident} SKIP (lsn = '<finish LSN from the log>'); then reset the "
                f"counters: SELECT pg_stat_reset_subscription_stats({sub.oid});",
            )
        else:
            report.add("subscription errors", "ok", found)

    mode = {"f": "off", "t": "on", "p": "parallel", "false": "off", "true": "on"}.get(
        str(sub.streaming), str(sub.streaming)
    )
    report.add(
        "subscription streaming",
        "ok",
        f"streaming = {mode}"
        + {
            "off": " (large transactions reach the service database when they commit)",
            "on": " (large transactions are streamed as they run, applied at commit)",
            "parallel": " (large transactions are applied by parallel apply workers; the notify "
            "trigger fires there too)",
        }.get(mode, ""),
    )
    return sub


async def _primary_checks(report: Report, url: str, sub: _Subscription | None) -> None:
    conn = await _connect(report, "primary", url)
    if conn is None:
        return
    try:
        settings = await conn.fetchrow(_SQL("wal_level"))
        assert settings is not None
        restart = "ALTER SYSTEM SET wal_level = logical; then restart the primary"
        level: Level = "ok" if settings["wal_level"] == "logical" else "fail"
        report.add("primary wal_level", level, f"wal_level = {settings['wal_level']}", restart)

        keep = str(settings["max_slot_wal_keep_size"])
        unbounded = keep in ("-1", "-1MB")
        report.add(
            "primary max_slot_wal_keep_size",
            "warn" if unbounded else "ok",
            "unset (-1): a slot left behind keeps WAL until the disk fills" if unbounded else keep,
            "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf(); "
            "(size it above the WAL of your longest subscriber outage)",
        )
        idle = settings["idle_replication_slot_timeout"]
        if int(settings["version_num"]) >= 180000 and idle is not None:
            off = str(idle) == "0"
            report.add(
                "primary idle_replication_slot_timeout",
                "warn" if off and unbounded else "ok",
                ("0 (off)" if off else f"{idle} s")
                + (
                    ": with max_slot_wal_keep_size unset nothing bounds an abandoned slot"
                    if off and unbounded
                    else ""
                ),
                "ALTER SYSTEM SET idle_replication_slot_timeout = '2d'; SELECT pg_reload_conf();",
            )

        pub = await conn.fetchrow(_SQL("publication"))
        if pub is None:
            report.add(
                "primary publication", "fail", "no publication outbox_relay", "outbox-relay migrate --primary"
            )
        else:
            extra = [
                op
                for op, on in (("update", pub["upd"]), ("delete", pub["del"]), ("truncate", pub["trunc"]))
                if on
            ]
            if not pub["has_outbox"]:
                report.add(
                    "primary publication",
                    "fail",
                    "outbox_relay does not hold outbox_relay.outbox",
                    "ALTER PUBLICATION outbox_relay ADD TABLE outbox_relay.outbox;",
                )
            elif not pub["ins"] or extra:
                found = "publish = " + ", ".join(["insert"] * bool(pub["ins"]) + extra)
                report.add(
                    "primary publication",
                    "fail",
                    found + " (want 'insert' only: an update or delete there must never reach the service)",
                    "ALTER PUBLICATION outbox_relay SET (publish = 'insert');",
                )
            else:
                report.add("primary publication", "ok", "outbox_relay, publish = 'insert', holds the outbox")

        if sub is None:
            return
        if sub.slot is None:
            return  # reported with the subscription
        slot = await conn.fetchrow(_SQL("slot"), sub.slot)
        recreate = "outbox-relay unsubscribe && outbox-relay subscribe (copies only what is missing)"
        if slot is None:
            report.add("primary slot", "fail", f"slot {sub.slot} does not exist on the primary", recreate)
            return
        lag = slot["lag_bytes"]
        found = (
            f"{sub.slot} {'active' if slot['active'] else 'inactive'}, wal_status {slot['wal_status']}, "
            f"lag {'unknown' if lag is None else _bytes(int(lag))}"
        )
        if slot["wal_status"] == "lost":
            report.add("primary slot", "fail", found + " (the WAL it needed is gone)", recreate)
        elif not slot["active"]:
            report.add(
                "primary slot",
                "fail" if sub.enabled else "warn",
                found + ": no subscriber streams from it, WAL piles up",
                f"ALTER SUBSCRIPTION {quote_ident(sub.name)} ENABLE; (on the service database)"
                if not sub.enabled
                else "see the apply worker line and the service database server's log",
            )
        elif slot["wal_status"] == "unreserved" or (lag is not None and int(lag) > SLOT_LAG_WARN_BYTES):
            report.add(
                "primary slot",
                "warn",
                found,
                "the subscriber falls behind: check the apply worker and the service database's load",
            )
        else:
            report.add("primary slot", "ok", found)
    except Exception as exc:
        report.add("primary", "fail", f"could not read the primary: {describe(exc)}", None)
    finally:
        await conn.close()


# -- relay, workers, Redis -------------------------------------------------------------------------


async def _queue_checks(report: Report, config: DoctorConfig, worker_sessions: int | None) -> None:
    from outbox_relay.arq_adapter import redis_facts

    facts = await redis_facts(config.redis_url, config.queue_name)
    if not facts["reachable"]:
        report.add(
            "redis",
            "fail",
            f"cannot reach Redis: {facts['error']}",
            "check OUTBOX_RELAY_REDIS_URL and that Redis is up",
        )
    else:
        report.add(
            "redis",
            "ok",
            f"Redis {facts['version']}, {facts['queue_depth']} jobs waiting in {config.queue_name}",
        )
        policy = facts["maxmemory_policy"]
        report.add(
            "redis maxmemory-policy",
            "ok" if policy == "noeviction" else "fail",
            str(policy) if policy == "noeviction" else f"{policy}: Redis may evict queued jobs silently",
            "redis-cli CONFIG SET maxmemory-policy noeviction (and set it in redis.conf)",
        )
    await _worker_check(report, config, facts, worker_sessions)


async def _relay_check(report: Report, conn: Connection) -> int:
    """The relay line; returns how many worker sessions the service database has (for the workers line)."""
    holders = await conn.fetch(_SQL("relay_lock_holders"))
    lease = None
    if await conn.fetchval(_SQL("relay_lease_exists")):
        lease = await conn.fetchrow(_SQL("relay_lease"))
    sessions = int(await conn.fetchval(_SQL("worker_sessions")))
    lease_text = ""
    if lease is not None and lease["expires_in"] is not None:
        expires = float(lease["expires_in"])
        lease_text = f"; lease epoch {lease['epoch']} " + (
            f"expires in {_seconds(expires)}" if expires > 0 else f"expired {_seconds(-expires)} ago"
        )
    start = "start `outbox-relay run` next to the service database (two for a hot standby)"
    if not holders:
        report.add(
            "relay",
            "fail",
            "no relay holds the leadership lock: rows are not handed to the queue" + lease_text,
            start,
        )
        return sessions
    holder = holders[0]
    found = (
        f"active relay: pid {holder['pid']} ({holder['application_name'] or '?'}"
        + (f", from {holder['client_addr']}" if holder["client_addr"] else "")
        + (
            f", session {_seconds(float(holder['session_age']))} old"
            if holder["session_age"] is not None
            else ""
        )
        + ")"
        + lease_text
    )
    if lease is not None and lease["expires_in"] is not None and float(lease["expires_in"]) < 0:
        report.add(
            "relay",
            "warn",
            found + ": the lock holder does not renew its lease (frozen?)",
            f"check the relay process; if it is hung: SELECT pg_terminate_backend({holder['pid']});",
        )
    else:
        report.add("relay", "ok", found)
    return sessions


async def _worker_check(
    report: Report, config: DoctorConfig, facts: dict[str, Any], sessions: int | None
) -> None:
    in_db = "" if sessions is None else f"; {sessions} worker sessions in the service database"
    start = f"start `outbox-relay worker` with OUTBOX_RELAY_QUEUE_NAME={config.queue_name}"
    if not facts["reachable"]:
        report.add("workers", "fail", "unknown: Redis is unreachable" + in_db, start)
    elif facts["worker_health"] is not None:
        ttl = facts["worker_health_ttl"]
        report.add(
            "workers",
            "ok",
            f"a worker refreshed {facts['worker_health_key']}"
            + ("" if ttl is None else f" (valid {ttl:.0f} s more)")
            + f": {facts['worker_health']}{in_db}",
        )
    elif sessions:
        report.add(
            "workers",
            "warn",
            f"no worker refreshed {facts['worker_health_key']} in the last minute{in_db} "
            "(a worker stopping cleanly deletes the key; the others rewrite it within 60 s)",
            start,
        )
    else:
        report.add("workers", "fail", f"no live worker for queue {config.queue_name}{in_db}", start)


def render_json(report: Report) -> str:
    """`doctor --json`."""
    return json.dumps(report.as_json())
