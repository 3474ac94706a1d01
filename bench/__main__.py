"""``python -m bench`` (``./dev bench``): the flags, and one clean line for a failure."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import BenchError
from bench.options import BenchOptions
from bench.run import run_bench
from outbox_relay import logs
from outbox_relay.exceptions import OutboxRelayError, SettingsError, UsageError
from outbox_relay.lifecycle import run_async
from outbox_relay.settings import load_settings

PROG = "./dev bench"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _count_or_zero(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError("must be 0 (skip) to 1000000")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="measure throughput, latency, backlog drain and table-scale costs"
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a smoke run of a few seconds")
    add("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    add("--events", type=_positive_int, default=10_000, help="events per throughput run")
    add("--workers", type=_positive_int, default=2, help="worker processes (2)")
    add("--backlog", type=_positive_int, default=50_000, help="backlog rows (50000)")
    add(
        "--table-rows",
        type=_positive_int,
        default=1_000_000,
        help="finished rows for the table-scale check (1000000)",
    )
    add(
        "--rounds",
        type=_positive_int,
        default=3,
        help="rounds of the scaling runs, interleaved; each figure is their median (3)",
    )
    add(
        "--drain-rows",
        type=_count_or_zero,
        default=20_000,
        help="backlog rows each worker count drains in the scaling rounds (20000; 0: skip)",
    )
    add(
        "--accounts",
        type=_positive_int,
        default=100,
        help="ledger accounts the reservations are spread over (100; 1: one hot account)",
    )
    add(
        "--sink-events",
        type=_count_or_zero,
        default=5_000,
        help="events through each sink route, one transaction each (5000; 0: skip the sink routes)",
    )
    add(
        "--rabbitmq-url",
        metavar="URL",
        help="the rabbitmq route's broker (default: OUTBOX_RELAY_TEST_RABBITMQ_URL, else "
        "amqp://guest:guest@127.0.0.1:5672/)",
    )
    add(
        "--fsync-off",
        action="store_true",
        help="run the embedded PostgreSQL with fsync and synchronous_commit off (default: durable)",
    )
    add(
        "--use-settings",
        action="store_true",
        help="run on the servers of OUTBOX_RELAY_DATABASE_URL and _REDIS_URL (it creates and "
        "drops its own databases there) instead of embedded ones",
    )
    return parser


def options_from(args: argparse.Namespace) -> BenchOptions:
    """The measurements the flags ask for (``--quick``: the smoke run, sizes fixed)."""
    common = {
        "json_path": args.json,
        "use_settings": args.use_settings,
        "fsync_off": args.fsync_off,
        "accounts": args.accounts,
        "rabbitmq_url": args.rabbitmq_url,
    }
    if args.quick:
        return BenchOptions.quick(**common)
    return BenchOptions(
        events=args.events,
        workers=args.workers,
        backlog=args.backlog,
        table_rows=args.table_rows,
        rounds=args.rounds,
        drain_rows=args.drain_rows,
        sink_events=args.sink_events,
        **common,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn a failure into one line on stderr and an exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        logs.configure(settings.log_level, settings.log_format)
        # The bench narrates itself: only problems should interrupt it.
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        if args.use_settings:
            settings.require_database_url()
        return run_async(run_bench(options_from(args), settings))
    except (SettingsError, UsageError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (OutboxRelayError, BenchError) as exc:
        print(f"{PROG}: {logs.scrub(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
