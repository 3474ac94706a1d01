"""`doctor`: check a deployment end to end, one line per check (contract section 3).

Each check says ``ok``, ``warn`` or ``fail``, what it found and, when not ok,
the fix: the SQL or the command. It reads, never writes. The queries are in
``doctor.sql``; the queue's server is read through the queue port
(:class:`outbox_relay.queue.Diagnosable`: the backend names its own lines).

A check is one function registered with :func:`check`: its place in the
report (``order``) and what it needs (a connection to the service database,
and its subscription, or to the primary; or the queue). Checks of one need run together on one
connection; a check that finds the rest pointless ends its group (``halt``).

The queue's name is resolved from the service database as `run` and `worker`
resolve it (QUEUE_NAME, else derived from the database's identity); without
that database, QUEUE_NAME alone names it. How "one live worker" is told: the
queue backend says how a worker consuming *this queue* showed itself (the arq
adapter: a health-check key its workers refresh), and which databases its jobs
and live workers belong to (``queue database``: another's is a shared queue
name). The workers' database sessions (``application_name =
'outbox_relay.worker'``) are reported alongside but decide nothing on their
own: a worker's pool closes idle connections after a minute, and the sessions
do not name the queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from outbox_relay.db import Connection, DirectConnection, connect, quote_ident
from outbox_relay.diagnosis import Check, Level
from outbox_relay.handlers import Plugin
from outbox_relay.identity import ServiceQueue, resolve_queue
from outbox_relay.logs import describe
from outbox_relay.migrate import migration_sets
from outbox_relay.queue import Diagnosable, Diagnosis
from outbox_relay.sql import QueryFile, query

__all__ = ["Check", "DoctorConfig", "DoctorContext", "Level", "Report", "check", "render_json", "run_doctor"]

_SQL = QueryFile(Path(__file__).resolve().parent / "doctor.sql")

#: Thresholds (documented in the README's "Operating it").
SLOT_LAG_WARN_BYTES = 1 << 30  # 1 GiB of WAL the slot has not confirmed
RECEIPT_AGE_WARN = 120.0  # s without a message from the primary (keepalives come every ~30 s)
NOTIFY_QUEUE_WARN, NOTIFY_QUEUE_FAIL = 0.10, 0.50  # fraction of the 8 GB notification queue
OLD_XACT_WARN, OLD_XACT_FAIL = 300.0, 3600.0  # s a snapshot has been held back
PENDING_FAIL_FACTOR = 5  # oldest pending older than 5 x REQUEUE_AFTER fails
DEAD_TUPLES_MIN = 100_000  # dead tuples worth a warning at all...
DEAD_TUPLES_RATIO = 0.5  # ...when also more than half the live ones
CLOCK_SKEW_WARN = 1.0  # s between any two of this host, PostgreSQL and the queue's server


@dataclass(frozen=True)
class DoctorConfig:
    """What doctor needs of the settings (built once by the CLI). URLs are secrets."""

    database_url: str
    #: The queue backend's diagnostics of the queue of a name.
    queue: Callable[[str], Diagnosable]
    #: QUEUE_NAME (None: derived from the service database).
    queue_name: str | None
    requeue_after: float
    primary_url: str | None = None
    subscription_name: str | None = None
    plugins: Sequence[Plugin] = ()

    def __repr__(self) -> str:
        return f"DoctorConfig(queue_name={self.queue_name!r}, requeue_after={self.requeue_after})"


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


# -- the registry of checks ------------------------------------------------------------------------

#: What a check needs: the service database's connection (and its subscription), the primary's, or the queue.
Needs = Literal["service", "subscription", "primary", "queue"]


@dataclass
class DoctorContext:
    """What a check reads (the config, the connection of its group) and what checks tell later ones."""

    config: DoctorConfig
    report: Report = field(default_factory=Report)
    #: The connection of the running group (service database or primary); None for the queue's.
    conn: Connection | None = None
    #: Set by a check to end its group (the remaining checks of the group are pointless).
    halted: bool = False
    subscription: _Subscription | None = None
    apply_running: bool = False
    tables_not_ready: list[str] = field(default_factory=list)
    #: Worker sessions in the service database (None: not counted).
    worker_sessions: int | None = None
    diagnosis: Diagnosis | None = None
    #: The service database server's clock minus this host's (s; None: not read).
    database_clock_offset: float | None = None
    #: The service database's queue, once read from it.
    queue: ServiceQueue | None = None

    @property
    def queue_name(self) -> str | None:
        """The queue's name: resolved from the service database, else QUEUE_NAME (None: unknown)."""
        return self.queue.name if self.queue is not None else self.config.queue_name

    @property
    def sub(self) -> _Subscription:
        assert self.subscription is not None, "a check needing the subscription ran without one"
        return self.subscription

    @property
    def db(self) -> Connection:
        assert self.conn is not None, "a check needing a database ran without one"
        return self.conn

    def add(self, name: str, status: Level, detail: str, fix: str | None = None) -> None:
        self.report.add(name, status, detail, fix)

    def halt(self) -> None:
        self.halted = True


CheckFunction = Callable[[DoctorContext], Awaitable[None]]
_CHECKS: list[tuple[int, Needs, CheckFunction]] = []


def check(order: int, needs: Needs) -> Callable[[CheckFunction], CheckFunction]:
    """Register a check: ``order`` places its lines in the report, ``needs`` says what it reads."""

    def register(function: CheckFunction) -> CheckFunction:
        _CHECKS.append((order, needs, function))
        _CHECKS.sort(key=lambda entry: entry[0])
        return function

    return register


def _group(needs: Needs) -> list[tuple[Needs, CheckFunction]]:
    """The checks of one group, in order, with what each needs (a subscription's run with the
    service database's)."""
    wanted = {needs, "subscription"} if needs == "service" else {needs}
    return [(n, function) for _, n, function in _CHECKS if n in wanted]


async def run_doctor(config: DoctorConfig) -> Report:
    """Make every check; never raises for what it finds (a failure to connect is a check too)."""
    ctx = DoctorContext(config)
    await _on_database(ctx, "service")
    await _on_database(ctx, "primary")
    await _run_group(ctx, "queue")
    return ctx.report


async def _on_database(ctx: DoctorContext, needs: Literal["service", "primary"]) -> None:
    """The group ``needs`` on one connection; the primary's stops at its first error (a line)."""
    url = ctx.config.database_url if needs == "service" else ctx.config.primary_url
    if url is None:
        return
    conn = await _connect(ctx.report, "service database" if needs == "service" else "primary", url)
    if conn is None:
        return
    ctx.conn = conn
    try:
        await _run_group(ctx, needs)
    except Exception as exc:
        if needs == "service":
            raise
        ctx.add("primary", "fail", f"could not read the primary: {describe(exc)}", None)
    finally:
        ctx.conn = None
        await conn.close()


async def _run_group(ctx: DoctorContext, needs: Needs) -> None:
    ctx.halted = False
    for need, function in _group(needs):
        if ctx.halted:
            return
        if need == "subscription" and ctx.subscription is None:
            continue  # the service database subscribes to nothing
        await function(ctx)


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


@check(9, needs="service")
async def _database_clock(ctx: DoctorContext) -> None:
    """Reads the service database server's clock for the ``clocks`` line (no line of its own)."""
    before = time.time()
    server = float(await ctx.db.fetchval(_SQL("clock")))
    ctx.database_clock_offset = server - (before + time.time()) / 2


@check(10, needs="service")
async def _service_database(ctx: DoctorContext) -> None:
    """The database holds the service schema; else nothing more is read from it."""
    from outbox_relay.admin import database_shape

    server = await ctx.db.fetchrow(_SQL("server"))
    assert server is not None
    shape = await database_shape(ctx.db)
    if shape == "service":
        ctx.add("service database", "ok", f"{server['database']}, PostgreSQL {server['version']}")
        return
    found = "the primary's producer schema" if shape == "primary" else "no outbox_relay schema"
    fix = (
        "point OUTBOX_RELAY_DATABASE_URL at the service database"
        if shape == "primary"
        else "outbox-relay migrate"
    )
    ctx.add("service database", "fail", f"{server['database']} holds {found}", fix)
    ctx.halt()


@check(15, needs="service")
async def _queue_name(ctx: DoctorContext) -> None:
    """The queue `run` and `worker` use on this database: QUEUE_NAME, else derived from it."""
    ctx.queue = queue = await resolve_queue(ctx.db, ctx.config.queue_name)
    source = "derived from" if queue.derived else "OUTBOX_RELAY_QUEUE_NAME, for"
    ctx.add("queue name", "ok", f"{queue.name} ({source} service database {queue.database.describe()})")


@check(20, needs="service")
async def _schema(ctx: DoctorContext) -> None:
    if not await ctx.db.fetchval(query("migrations_table_exists")):
        ctx.add("schema", "fail", "no outbox_relay.schema_migrations", "outbox-relay migrate")
        return
    for mset in migration_sets("service", ctx.config.plugins):
        current = int(await ctx.db.fetchval(query("schema_version"), mset.target))
        name = f"schema {mset.target}"
        if current < mset.latest:
            ctx.add(name, "fail", f"version {current}, this code needs {mset.latest}", "outbox-relay migrate")
        elif current > mset.latest:
            ctx.add(
                name,
                "fail",
                f"version {current}, newer than this code's {mset.latest}",
                "run the outbox_relay release that migrated it (or newer)",
            )
        else:
            ctx.add(name, "ok", f"version {current}")


@check(30, needs="service")
async def _notify_trigger(ctx: DoctorContext) -> None:
    enabled = await ctx.db.fetchval(_SQL("notify_trigger"))
    always = "ALTER TABLE outbox_relay.outbox ENABLE ALWAYS TRIGGER outbox_notify;"
    if enabled is None:
        ctx.add("notify trigger", "fail", "outbox_notify is missing", "outbox-relay migrate")
    elif enabled == "A":
        ctx.add("notify trigger", "ok", "outbox_notify ENABLE ALWAYS")
    else:
        meaning = {
            "D": "disabled: no row wakes the relay, every row waits for the sweep",
            "O": "enabled for local rows only: replicated rows never wake the relay",
            "R": "enabled for replicated rows only: rows written here never wake the relay",
        }.get(str(enabled), f"in state {enabled!r}")
        ctx.add("notify trigger", "fail", f"outbox_notify {meaning}", always)


@check(40, needs="service")
async def _oldest_pending(ctx: DoctorContext) -> None:
    age = await ctx.db.fetchval(query("oldest_pending_age"))
    limit = ctx.config.requeue_after
    fix = (
        "see `outbox-relay status`; check the relay and worker lines here; start more workers "
        "(`outbox-relay worker`)"
    )
    if age is None:
        ctx.add("oldest pending", "ok", "no pending row")
        return
    age = max(0.0, float(age))
    found = f"{_seconds(age)} old (REQUEUE_AFTER {_seconds(limit)})"
    if age > PENDING_FAIL_FACTOR * limit:
        ctx.add("oldest pending", "fail", found, fix)
    elif age > limit:
        ctx.add("oldest pending", "warn", found, fix)
    else:
        ctx.add("oldest pending", "ok", found)


@check(41, needs="service")
async def _failed_rows(ctx: DoctorContext) -> None:
    failed = int(await ctx.db.fetchval(_SQL("failed_count")))
    if not failed:
        ctx.add("failed rows", "ok", "none")
        return
    ctx.add(
        "failed rows",
        "warn",
        f"{failed} row{'s' if failed != 1 else ''} failed",
        "see their errors with `outbox-relay status`; after the cause is fixed: "
        "`outbox-relay requeue --all-failed`",
    )


@check(50, needs="service")
async def _notification_queue(ctx: DoctorContext) -> None:
    usage = float(await ctx.db.fetchval(_SQL("notification_queue")))
    found = f"{usage * 100:.2f} % of the queue used"
    fix = (
        "a listening session inside a long transaction blocks its cleanup: find it with "
        "SELECT pid, xact_start, query FROM pg_stat_activity WHERE xact_start < now() - interval '5 min'; "
        "then SELECT pg_terminate_backend(pid);"
    )
    level: Level = "fail" if usage >= NOTIFY_QUEUE_FAIL else "warn" if usage >= NOTIFY_QUEUE_WARN else "ok"
    ctx.add("notification queue", level, found, fix)


@check(51, needs="service")
async def _dead_tuples(ctx: DoctorContext) -> None:
    tuples = await ctx.db.fetchrow(_SQL("outbox_tuples"))
    if tuples is None:
        return
    live, dead = int(tuples["live"]), int(tuples["dead"])
    ago = tuples["vacuumed_ago"]
    found = f"{dead} dead / {live} live tuples, vacuumed " + (
        "never" if ago is None else f"{_seconds(float(ago))} ago"
    )
    if dead >= DEAD_TUPLES_MIN and dead > DEAD_TUPLES_RATIO * live:
        ctx.add(
            "outbox dead tuples",
            "warn",
            found,
            "VACUUM (VERBOSE) outbox_relay.outbox; if it removes little, an old transaction "
            "holds it back (see the xmin line)",
        )
    else:
        ctx.add("outbox dead tuples", "ok", found)


@check(52, needs="service")
async def _xmin_horizon(ctx: DoctorContext) -> None:
    oldest = await ctx.db.fetchrow(_SQL("oldest_xmin"))
    if oldest is None or oldest["xact_seconds"] is None:
        ctx.add("xmin horizon", "ok", "no transaction holds back vacuum")
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
    level: Level = "fail" if seconds >= OLD_XACT_FAIL else "warn" if seconds >= OLD_XACT_WARN else "ok"
    ctx.add("xmin horizon", level, found, fix)


# -- replication, on the service database ------------------------------------------------------


@check(60, needs="service")
async def _subscription(ctx: DoctorContext) -> None:
    """The one subscription to the outbox publication (later checks read it from ``ctx``)."""
    config = ctx.config
    rows = await ctx.db.fetch(_SQL("subscriptions"), config.subscription_name)
    if not rows:
        if config.subscription_name is not None:
            found = f"no subscription {config.subscription_name} in this database"
            ctx.add("subscription", "fail", found, "outbox-relay subscribe")
        elif config.primary_url is not None:
            found = "PRIMARY_URL is set but this database subscribes to no outbox publication"
            ctx.add("subscription", "fail", found, "outbox-relay subscribe")
        else:
            ctx.add("subscription", "ok", "none: the direct shape (rows are written here)")
        return
    if len(rows) > 1:
        names = ", ".join(r["name"] for r in rows)
        ctx.add(
            "subscription",
            "fail",
            f"several subscriptions to the outbox publication: {names}",
            "set OUTBOX_RELAY_SUBSCRIPTION_NAME to the one in use; drop the others",
        )
        return
    row = rows[0]
    sub = _Subscription(int(row["oid"]), row["name"], row["enabled"], row["slot"], row["streaming"])
    ctx.subscription = sub
    if not sub.enabled:
        ctx.add(
            "subscription", "fail", f"{sub.name} is disabled", f"ALTER SUBSCRIPTION {_ident(sub)} ENABLE;"
        )
    elif sub.slot is None:
        ctx.add(
            "subscription",
            "fail",
            f"{sub.name} has no slot (slot_name = NONE)",
            "outbox-relay unsubscribe && outbox-relay subscribe",
        )
    else:
        ctx.add("subscription", "ok", f"{sub.name} enabled, slot {sub.slot}")


def _ident(sub: _Subscription) -> str:
    return quote_ident(sub.name)


@check(61, needs="subscription")
async def _apply_worker(ctx: DoctorContext) -> None:
    sub = ctx.sub
    worker = await ctx.db.fetchrow(_SQL("apply_worker"), sub.oid)
    ctx.apply_running = worker is not None and worker["pid"] is not None
    if worker is None or worker["pid"] is None:
        fix = (
            f"ALTER SUBSCRIPTION {_ident(sub)} ENABLE;"
            if not sub.enabled
            else "see the service database server's log for the apply worker's error "
            "(max_logical_replication_workers reached, primary unreachable, slot missing)"
        )
        ctx.add("apply worker", "fail", "not running", fix)
        return
    receipt = worker["receipt_age"]
    heard = (
        "never heard from the primary"
        if receipt is None
        else (f"last heard from the primary {_seconds(float(receipt))} ago")
    )
    lag = worker["lag_seconds"]
    lag_text = "" if lag is None else f", lag {_seconds(max(0.0, float(lag)))}"
    silent = receipt is not None and float(receipt) > RECEIPT_AGE_WARN
    fix = "check the primary is reachable from the service database's server"
    ctx.add("apply worker", "warn" if silent else "ok", f"pid {worker['pid']}, {heard}{lag_text}", fix)


@check(62, needs="subscription")
async def _subscription_tables(ctx: DoctorContext) -> None:
    sub = ctx.sub
    tables = await ctx.db.fetch(_SQL("subscription_tables"), sub.oid)
    ctx.tables_not_ready = [f"{t['relation']} ({t['state']})" for t in tables if t["state"] != "r"]
    if not tables:
        ctx.add(
            "subscription tables",
            "fail",
            "the subscription replicates no table",
            f"check the primary's publication, then ALTER SUBSCRIPTION {_ident(sub)} REFRESH PUBLICATION;",
        )
    elif ctx.tables_not_ready:
        ctx.add(
            "subscription tables",
            "warn" if ctx.apply_running else "fail",
            "not ready: " + ", ".join(ctx.tables_not_ready) + " (i/d: initial copy, f/s: catching up)",
            "wait for the initial copy; if it does not move, see the server log for sync errors",
        )
    else:
        ctx.add("subscription tables", "ok", f"{len(tables)} ready")


@check(63, needs="subscription")
async def _subscription_errors(ctx: DoctorContext) -> None:
    sub = ctx.sub
    errors = await ctx.db.fetchrow(_SQL("subscription_errors"), sub.oid)
    if errors is None:
        return
    apply_errors, sync_errors = int(errors["apply_errors"]), int(errors["sync_errors"])
    found = f"{apply_errors} apply errors, {sync_errors} sync errors"
    if not (apply_errors or sync_errors):
        ctx.add("subscription errors", "ok", found)
        return
    recovered = ctx.apply_running and not ctx.tables_not_ready
    ctx.add(
        "subscription errors",
        "warn" if recovered else "fail",
        found + (" (counted earlier; replication runs now)" if recovered else ""),
        "read the error in the service database server's log; a change that can never apply: "
        f"ALTER SUBSCRIPTION {_ident(sub)} SKIP (lsn = '<finish LSN from the log>'); then reset the "
        f"counters: SELECT pg_stat_reset_subscription_stats({sub.oid});",
    )


_STREAMING_MODES = {"f": "off", "t": "on", "p": "parallel", "false": "off", "true": "on"}
_STREAMING_MEANING = {
    "off": " (large transactions reach the service database when they commit)",
    "on": " (large transactions are streamed as they run, applied at commit)",
    "parallel": " (large transactions are applied by parallel apply workers; the notify "
    "trigger fires there too)",
}


@check(64, needs="subscription")
async def _subscription_streaming(ctx: DoctorContext) -> None:
    sub = ctx.sub
    mode = _STREAMING_MODES.get(str(sub.streaming), str(sub.streaming))
    ctx.add("subscription streaming", "ok", f"streaming = {mode}" + _STREAMING_MEANING.get(mode, ""))


# -- the relay (service database) ------------------------------------------------------------------


@check(70, needs="service")
async def _relay(ctx: DoctorContext) -> None:
    """The relay line; counts the worker sessions of the service database (for the workers line)."""
    holders = await ctx.db.fetch(_SQL("relay_lock_holders"))
    lease = None
    if await ctx.db.fetchval(_SQL("relay_lease_exists")):
        lease = await ctx.db.fetchrow(_SQL("relay_lease"))
    ctx.worker_sessions = int(await ctx.db.fetchval(_SQL("worker_sessions")))
    expires = None if lease is None or lease["expires_in"] is None else float(lease["expires_in"])
    lease_text = ""
    if lease is not None and expires is not None:
        lease_text = f"; lease epoch {lease['epoch']} " + (
            f"expires in {_seconds(expires)}" if expires > 0 else f"expired {_seconds(-expires)} ago"
        )
    if not holders:
        ctx.add(
            "relay",
            "fail",
            "no relay holds the leadership lock: rows are not handed to the queue" + lease_text,
            "start `outbox-relay run` next to the service database (two for a hot standby)",
        )
        return
    holder = holders[0]
    found = _relay_holder(holder) + lease_text
    if expires is not None and expires < 0:
        ctx.add(
            "relay",
            "warn",
            found + ": the lock holder does not renew its lease (frozen?)",
            f"check the relay process; if it is hung: SELECT pg_terminate_backend({holder['pid']});",
        )
    else:
        ctx.add("relay", "ok", found)


def _relay_holder(holder: Any) -> str:
    return (
        f"active relay: pid {holder['pid']} ({holder['application_name'] or '?'}"
        + (f", from {holder['client_addr']}" if holder["client_addr"] else "")
        + (
            f", session {_seconds(float(holder['session_age']))} old"
            if holder["session_age"] is not None
            else ""
        )
        + ")"
    )


# -- the sinks and routed kinds (service database) ---------------------------------------------


@check(80, needs="service")
async def _plugin_checks(ctx: DoctorContext) -> None:
    """Each plugin's own lines (the routed sinks: servers, streams, topics, exchanges), given the
    kinds of the newest rows."""
    asking = [plugin for plugin in ctx.config.plugins if plugin.diagnose is not None]
    if not asking:
        return
    kinds = [r["kind"] for r in await ctx.db.fetch(_SQL("recent_kinds"))]
    for plugin in asking:
        assert plugin.diagnose is not None
        for line in await plugin.diagnose(kinds):
            ctx.add(line.name, line.status, line.detail, line.fix)


@check(81, needs="service")
async def _unrouted_kinds(ctx: DoctorContext) -> None:
    """Pending rows of a kind no live worker handles or routes (a worker missing a route, a
    rolling change of ROUTES gone wrong): they fail as `unknown kind` when a worker takes them."""
    live = await ctx.db.fetch(_SQL("live_workers"))
    if not live:
        return  # the workers line says there is none
    pending = await ctx.db.fetch(_SQL("pending_kinds"))
    handled = [(list(w["routes"]), set(w["kinds"])) for w in live]
    unrouted = {
        r["kind"]: r["rows"]
        for r in pending
        if not any(
            r["kind"] in kinds or any(fnmatchcase(r["kind"], p) for p in routes) for routes, kinds in handled
        )
    }
    if not unrouted:
        ctx.add("routed kinds", "ok", f"every pending kind has a live worker ({len(pending)} kinds pending)")
        return
    shown = ", ".join(f"{kind} ({n} rows)" for kind, n in sorted(unrouted.items())[:5])
    ctx.add(
        "routed kinds",
        "warn",
        f"no live worker handles or routes {len(unrouted)} pending kind(s): {shown}",
        "set OUTBOX_RELAY_ROUTES on the workers to route them (or install their handler); "
        "until then they wait, and fail as `unknown kind` when a worker takes them",
    )


# -- the primary ---------------------------------------------------------------------------------


@check(110, needs="primary")
async def _primary_settings(ctx: DoctorContext) -> None:
    """wal_level, and what bounds the WAL a slot left behind keeps."""
    settings = await ctx.db.fetchrow(_SQL("wal_level"))
    assert settings is not None
    restart = "ALTER SYSTEM SET wal_level = logical; then restart the primary"
    level: Level = "ok" if settings["wal_level"] == "logical" else "fail"
    ctx.add("primary wal_level", level, f"wal_level = {settings['wal_level']}", restart)

    keep = str(settings["max_slot_wal_keep_size"])
    unbounded = keep in ("-1", "-1MB")
    ctx.add(
        "primary max_slot_wal_keep_size",
        "warn" if unbounded else "ok",
        "unset (-1): a slot left behind keeps WAL until the disk fills" if unbounded else keep,
        "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf(); "
        "(size it above the WAL of your longest subscriber outage)",
    )
    idle = settings["idle_replication_slot_timeout"]
    if int(settings["version_num"]) < 180000 or idle is None:
        return
    off = str(idle) == "0"
    ctx.add(
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


@check(120, needs="primary")
async def _primary_publication(ctx: DoctorContext) -> None:
    pub = await ctx.db.fetchrow(_SQL("publication"))
    if pub is None:
        ctx.add(
            "primary publication", "fail", "no publication outbox_relay", "outbox-relay migrate --primary"
        )
        return
    extra = [
        op for op, on in (("update", pub["upd"]), ("delete", pub["del"]), ("truncate", pub["trunc"])) if on
    ]
    if not pub["has_outbox"]:
        ctx.add(
            "primary publication",
            "fail",
            "outbox_relay does not hold outbox_relay.outbox",
            "ALTER PUBLICATION outbox_relay ADD TABLE outbox_relay.outbox;",
        )
    elif not pub["ins"] or extra:
        found = "publish = " + ", ".join(["insert"] * bool(pub["ins"]) + extra)
        ctx.add(
            "primary publication",
            "fail",
            found + " (want 'insert' only: an update or delete there must never reach the service)",
            "ALTER PUBLICATION outbox_relay SET (publish = 'insert');",
        )
    else:
        ctx.add("primary publication", "ok", "outbox_relay, publish = 'insert', holds the outbox")


@check(130, needs="primary")
async def _primary_slot(ctx: DoctorContext) -> None:
    """The subscription's slot on the primary (a subscription without one is reported with it)."""
    sub = ctx.subscription
    if sub is None or sub.slot is None:
        return
    slot = await ctx.db.fetchrow(_SQL("slot"), sub.slot)
    recreate = (
        "after a failover, with OUTBOX_RELAY_PRIMARY_URL naming the promoted primary: outbox-relay repoint; "
        "else outbox-relay unsubscribe && outbox-relay subscribe (either copies only what is missing)"
    )
    if slot is None:
        ctx.add("primary slot", "fail", f"slot {sub.slot} does not exist on the primary", recreate)
        return
    lag = slot["lag_bytes"]
    found = (
        f"{sub.slot} {'active' if slot['active'] else 'inactive'}, wal_status {slot['wal_status']}, "
        f"lag {'unknown' if lag is None else _bytes(int(lag))}"
    )
    if slot["wal_status"] == "lost":
        ctx.add("primary slot", "fail", found + " (the WAL it needed is gone)", recreate)
    elif not slot["active"]:
        ctx.add(
            "primary slot",
            "fail" if sub.enabled else "warn",
            found + ": no subscriber streams from it, WAL piles up",
            f"ALTER SUBSCRIPTION {_ident(sub)} ENABLE; (on the service database)"
            if not sub.enabled
            else "see the apply worker line and the service database server's log",
        )
    elif slot["wal_status"] == "unreserved" or (lag is not None and int(lag) > SLOT_LAG_WARN_BYTES):
        ctx.add(
            "primary slot",
            "warn",
            found,
            "the subscriber falls behind: check the apply worker and the service database's load",
        )
    else:
        ctx.add("primary slot", "ok", found)


@check(140, needs="primary")
async def _primary_failover(ctx: DoctorContext) -> None:
    """Whether the primary's physical standbys can take the slot over after a failover (17+), or why
    none can (15, 16), and what to do after one (:mod:`outbox_relay.failover`)."""
    from outbox_relay.failover import FailoverFacts, failover_checks

    sub = ctx.subscription
    if sub is None or sub.slot is None:
        return
    row = await ctx.db.fetchrow(_SQL("failover_facts"), sub.slot)
    for line in failover_checks(FailoverFacts.from_row(row, _ident(sub), sub.slot)):
        ctx.add(line.name, line.status, line.detail, line.fix)


# -- the queue and its workers -------------------------------------------------------------------


@check(210, needs="queue")
async def _queue_server(ctx: DoctorContext) -> None:
    """The queue backend's own lines: its server reachable, its settings, the jobs waiting."""
    if ctx.queue_name is None:
        ctx.add(
            "workers",
            "fail",
            "unknown: the queue's name derives from the service database, which could not be read",
            "see the service database line",
        )
        ctx.halt()
        return
    ctx.diagnosis = await ctx.config.queue(ctx.queue_name).diagnose()
    for line in ctx.diagnosis.checks:
        ctx.add(line.name, line.status, line.detail, line.fix)


@check(220, needs="queue")
async def _workers(ctx: DoctorContext) -> None:
    """A worker consuming this queue showed itself; its database sessions are said alongside."""
    diagnosis, sessions, queue_name = ctx.diagnosis, ctx.worker_sessions, ctx.queue_name
    assert diagnosis is not None
    in_db = "" if sessions is None else f"; {sessions} worker sessions in the service database"
    start = (
        "start `outbox-relay worker` without OUTBOX_RELAY_QUEUE_NAME (it derives the same name)"
        if ctx.queue is not None and ctx.queue.derived
        else f"start `outbox-relay worker` with OUTBOX_RELAY_QUEUE_NAME={queue_name}"
    )
    others_only = (
        ctx.queue is not None
        and bool(diagnosis.worker_databases)
        and ctx.queue.database.token not in diagnosis.worker_databases
    )
    if not diagnosis.reachable:
        ctx.add("workers", "fail", f"unknown: {diagnosis.server} is unreachable" + in_db, start)
    elif others_only:
        found = f"no live worker of this database for queue {queue_name}: its workers serve another"
        ctx.add("workers", "fail", found + in_db, start)
    elif diagnosis.workers_seen is not None:
        ctx.add("workers", "ok", diagnosis.workers_seen + in_db)
    elif sessions:
        ctx.add(
            "workers",
            "warn",
            f"no worker refreshed {diagnosis.workers_signal} in the last minute{in_db} "
            "(a worker stopping cleanly deletes the key; the others rewrite it within 60 s)",
            start,
        )
    else:
        ctx.add("workers", "fail", f"no live worker for queue {queue_name}{in_db}", start)


@check(230, needs="queue")
async def _queue_database(ctx: DoctorContext) -> None:
    """Every job waiting in the queue and every live worker of it belongs to this service database:
    another's means two services share the queue's name (their workers refuse each other's jobs)."""
    diagnosis, queue = ctx.diagnosis, ctx.queue
    if diagnosis is None or not diagnosis.reachable or queue is None:
        return
    own = queue.database.token
    jobs = {db: n for db, n in diagnosis.job_databases.items() if db != own}
    workers = [db for db in diagnosis.worker_databases if db != own]
    if not jobs and not workers:
        ctx.add(
            "queue database", "ok", f"the jobs and live workers of {queue.name} serve this database ({own})"
        )
        return
    found = []
    if jobs:
        listed = ", ".join(f"{n} of {db}" for db, n in sorted(jobs.items()))
        found.append(f"{queue.name} holds jobs of another service database ({listed})")
    if workers:
        found.append(f"a live worker of {queue.name} serves another service database ({', '.join(workers)})")
    fix = (
        "give each service database its own queue: unset OUTBOX_RELAY_QUEUE_NAME (the default derives "
        "from the database) or set distinct names, on the relay and workers of one of them, and restart them"
    )
    ctx.add("queue database", "fail", "; ".join(found) + f" (this database is {own})", fix)


@check(240, needs="queue")
async def _clocks(ctx: DoctorContext) -> None:
    """This host's clock against PostgreSQL's and the queue server's (whose clock the queue's
    timing goes by): warn when any two are more than :data:`CLOCK_SKEW_WARN` apart."""
    assert ctx.diagnosis is not None
    server = ctx.diagnosis.server
    offsets = {"PostgreSQL": ctx.database_clock_offset, server: ctx.diagnosis.clock_offset}
    found = ", ".join(
        f"{name} {'unknown' if offset is None else f'{offset:+.3f} s'}" for name, offset in offsets.items()
    )
    clocks = {"this host": 0.0, **{name: offset for name, offset in offsets.items() if offset is not None}}
    ahead = max(clocks, key=lambda name: clocks[name])
    behind = min(clocks, key=lambda name: clocks[name])
    spread = clocks[ahead] - clocks[behind]
    if spread <= CLOCK_SKEW_WARN:
        ctx.add("clocks", "ok", f"{found} from this host's clock")
        return
    ctx.add(
        "clocks",
        "warn",
        f"{found} from this host's clock: {ahead} is {_seconds(spread)} ahead of {behind}",
        "synchronise the hosts' clocks (NTP: chrony or systemd-timesyncd). The queue's timing goes "
        f"by {server}'s clock alone, so jobs are not delayed; but times logged and compared across "
        "hosts disagree. Run `outbox-relay doctor` on each relay and worker host to check its clock",
    )


def render_json(report: Report) -> str:
    """`doctor --json`."""
    return json.dumps(report.as_json())
