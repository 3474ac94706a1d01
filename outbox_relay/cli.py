"""The command line: ``python -m outbox_relay COMMAND`` (or ``outbox-relay COMMAND``).

This is the one error boundary: bad usage or settings exit 2 with one line on
stderr naming the setting, any other known failure exits 1 with a clear
message, and no traceback reaches an operator unless LOG_LEVEL is DEBUG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from outbox_relay import logs
from outbox_relay.backoff import describe
from outbox_relay.exceptions import OutboxRelayError, SettingsError, UsageError
from outbox_relay.settings import Settings, load_settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
Command = Callable[[argparse.Namespace, Settings], int]

PROG = "outbox-relay"


# -- helpers ---------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop (asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set (signals do nothing else)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _quiet_logs() -> None:
    """`demo` and `bench` narrate themselves: only problems should interrupt them."""
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))


async def _one_off_connection(settings: Settings) -> Any:
    from outbox_relay.db import connect_retrying

    return await connect_retrying(settings.require_database_url(), what="the service database")


# -- commands --------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.db import connect_retrying
    from outbox_relay.migrate import Target, latest_version, migrate

    target: Target = "primary" if args.primary else "service"
    url = settings.require_primary_url() if args.primary else settings.require_database_url()
    label = "primary" if args.primary else "service database"

    async def main() -> list[str]:
        conn = await connect_retrying(url, what=f"the {label}")
        try:
            return [f"{m.version:04d}_{m.name}" for m in await migrate(conn, target)]
        finally:
            await conn.close()

    applied = run_async(main())
    if applied:
        print(f"{label}: applied {', '.join(applied)}")
    else:
        print(f"{label}: up to date (version {latest_version(target)})")
    return 0


def cmd_subscribe(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.replication import subscribe

    result = run_async(subscribe(settings, wait=not args.no_wait))
    verb = "created" if result.created else "already exists"
    synced = "; initial copy done" if result.synced else ""
    print(f"subscription {result.name} {verb} (slot {result.name}){synced}")
    return 0


def cmd_unsubscribe(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.replication import unsubscribe

    result = run_async(unsubscribe(settings))
    sub = "dropped" if result.subscription_dropped else "was not there"
    slot = "dropped" if result.slot_dropped else "was not there"
    print(f"subscription {result.name} {sub}; slot {result.name} on the primary {slot}")
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.jobs import JobQueue, redis_client
    from outbox_relay.observability.http import serving
    from outbox_relay.relay import Relay

    settings.require_database_url()

    async def main() -> None:
        stop = stop_on_signals()
        redis = redis_client(settings.redis_url.get_secret_value(), queue_name=settings.queue_name)
        try:
            queue = JobQueue(redis, queue_name=settings.queue_name, namespace=settings.job_namespace)
            async with serving(settings) as (health, metrics):
                await Relay(settings, queue, stop, health=health, metrics=metrics).run()
        finally:
            await redis.aclose(close_connection_pool=True)

    run_async(main())
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.observability.http import serving
    from outbox_relay.worker import load_handler_modules, run_worker

    settings.require_database_url()
    load_handler_modules(settings)

    async def main() -> None:
        stop = stop_on_signals()
        async with serving(settings) as (health, metrics):
            await run_worker(settings, stop, burst=args.burst, health=health, metrics=metrics)

    run_async(main())
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.admin import status

    async def main() -> Any:
        conn = await _one_off_connection(settings)
        try:
            return await status(conn)
        finally:
            await conn.close()

    result = run_async(main())
    print(json.dumps(result.as_json()) if args.json else result.as_text())
    return 0


def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.admin import requeue

    if not args.correlation_id and not args.all_failed:
        raise UsageError("requeue needs --correlation-id ID (repeatable) or --all-failed")
    if args.correlation_id and args.all_failed:
        raise UsageError("requeue takes --correlation-id or --all-failed, not both")

    async def main() -> Any:
        conn = await _one_off_connection(settings)
        try:
            return await requeue(conn, correlation_ids=args.correlation_id, all_failed=args.all_failed)
        finally:
            await conn.close()

    result = run_async(main())
    print(f"requeued {result.requeued} row{'s' if result.requeued != 1 else ''}")
    for cid in result.not_failed:
        print(f"not a failed row: {cid}", file=sys.stderr)
    return 1 if result.not_failed else 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.bench import BenchOptions, run_bench

    if args.use_settings:
        settings.require_database_url()
    if args.quick:
        options = BenchOptions.quick(json_path=args.json, use_settings=args.use_settings)
    else:
        options = BenchOptions(
            events=args.events,
            workers=args.workers,
            backlog=args.backlog,
            table_rows=args.table_rows,
            json_path=args.json,
            use_settings=args.use_settings,
        )
    _quiet_logs()
    return run_bench(options, settings)


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    import math

    from outbox_relay.db import connect_retrying
    from outbox_relay.migrate import check_schema
    from outbox_relay.prune import prune_primary, prune_service
    from outbox_relay.settings import env_name

    older_than = args.older_than if args.older_than is not None else settings.retention
    if older_than is None:
        raise SettingsError(env_name("retention"), "is required for prune (or pass --older-than SECONDS)")
    if not (math.isfinite(older_than) and older_than > 0):
        raise UsageError("prune --older-than must be a number of seconds > 0")
    if args.primary and args.include_failed:
        raise UsageError("prune --include-failed applies to the service database, not with --primary")
    if args.wait is not None and not args.primary:
        raise UsageError("prune --wait applies only with --primary")
    wait = 30.0 if args.wait is None else args.wait
    if not (math.isfinite(wait) and wait >= 0):
        raise UsageError("prune --wait must be a number of seconds >= 0")
    label = "primary" if args.primary else "service database"
    url = settings.require_primary_url() if args.primary else settings.require_database_url()

    async def main() -> int:
        conn = await connect_retrying(url, what=f"the {label}")
        try:
            if args.primary:
                await check_schema(conn, "primary")
                return await prune_primary(
                    conn, older_than=older_than, batch_size=settings.prune_batch_size, wait_timeout=wait
                )
            await check_schema(conn, "service")
            return await prune_service(
                conn,
                older_than=older_than,
                batch_size=settings.prune_batch_size,
                include_failed=args.include_failed,
            )
        finally:
            await conn.close()

    pruned = run_async(main())
    print(f"pruned {pruned} row{'s' if pruned != 1 else ''} from the {label}")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from outbox_relay.demo import DemoOptions, run_demo

    options = DemoOptions(events=args.events, workers=args.workers, producers=args.producers, rate=args.rate)
    _quiet_logs()
    return run_demo(options)


# -- parser ----------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each sub-command carries its handler in ``command``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Relay a replicated transactional outbox to arq workers, exactly once.",
        epilog="Settings come from OUTBOX_RELAY_* environment variables (see the README).",
    )
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(command=handler)
        return sub

    migrate = add("migrate", cmd_migrate, "create or upgrade the schema (safe to run again)")
    migrate.add_argument(
        "--primary", action="store_true", help="migrate the primary (producer table and publication) instead"
    )

    subscribe = add(
        "subscribe",
        cmd_subscribe,
        "subscribe the service database to the primary's outbox (safe to run again)",
    )
    subscribe.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the subscription exists, before the initial copy ends",
    )

    add("unsubscribe", cmd_unsubscribe, "drop the subscription and its slot (safe to run again)")

    run = add("run", cmd_run, "the relay: LISTEN fast path plus periodic sweep")
    run.add_argument("--sweep-interval", type=float, help="OUTBOX_RELAY_SWEEP_INTERVAL")
    run.add_argument("--requeue-after", type=float, help="OUTBOX_RELAY_REQUEUE_AFTER")
    run.add_argument("--queue-name", help="OUTBOX_RELAY_QUEUE_NAME")

    worker = add("worker", cmd_worker, "an arq worker that applies the handlers")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument(
        "--concurrency", type=_positive_int, dest="worker_concurrency", help="OUTBOX_RELAY_WORKER_CONCURRENCY"
    )
    worker.add_argument("--queue-name", help="OUTBOX_RELAY_QUEUE_NAME")

    status = add("status", cmd_status, "counts per status, oldest pending row, failed rows")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    requeue = add("requeue", cmd_requeue, "put failed rows back to new, attempts reset")
    requeue.add_argument(
        "--correlation-id",
        action="append",
        default=[],
        metavar="ID",
        help="a failed row to requeue (repeatable)",
    )
    requeue.add_argument("--all-failed", action="store_true", help="every failed row")

    prune = add(
        "prune",
        cmd_prune,
        "delete finished rows older than RETENTION from the service database (or the primary's "
        "outbox: only rows every subscriber has received)",
    )
    prune.add_argument(
        "--primary",
        action="store_true",
        help="prune the primary's outbox instead: rows created before the cut-off that every "
        "logical replication slot has confirmed",
    )
    prune.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="the retention for this run (default: OUTBOX_RELAY_RETENTION)",
    )
    prune.add_argument(
        "--include-failed",
        action="store_true",
        help="also delete failed rows finished before the cut-off (service database only)",
    )
    prune.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="with --primary: how long to wait for the slots to confirm the rows (30)",
    )

    demo = add("demo", cmd_demo, "run everything on embedded PostgreSQL and Redis under a load, then report")
    demo.add_argument("--events", type=_positive_int, default=3000, help="events to drive (3000)")
    demo.add_argument("--workers", type=_positive_int, default=2, help="worker processes (2)")
    demo.add_argument(
        "--producers",
        type=_positive_int,
        default=4,
        help="concurrent producer connections on the primary (4)",
    )
    demo.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="events/s offered in the steady phase (200); the second half of the events is a burst",
    )

    bench = add("bench", cmd_bench, "measure throughput, latency, backlog drain and table-scale costs")
    bench.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    bench.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--events", type=_positive_int, default=10_000, help="events per throughput run")
    bench.add_argument("--workers", type=_positive_int, default=2, help="worker processes (2)")
    bench.add_argument("--backlog", type=_positive_int, default=50_000, help="backlog rows (50000)")
    bench.add_argument(
        "--table-rows",
        type=_positive_int,
        default=1_000_000,
        help="finished rows for the table-scale check (1000000)",
    )
    bench.add_argument(
        "--use-settings",
        action="store_true",
        help="run on the servers of OUTBOX_RELAY_DATABASE_URL and _REDIS_URL (it creates and "
        "drops its own databases there) instead of embedded ones",
    )
    return parser


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
        return command(args, settings)
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
