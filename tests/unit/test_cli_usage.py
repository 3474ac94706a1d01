"""The command line without servers: the parser, and usage/settings errors exiting 2 before connecting."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from outbox_relay import cli

CONTRACT_COMMANDS = {"migrate", "subscribe", "unsubscribe", "run", "worker", "status", "requeue", "demo"}
PASSWORD = "hunter2-s3cret"
#: TEST-NET-1: nothing answers there, so a connection attempt would hang, not fail fast.
UNREACHABLE_URL = f"postgresql://svc:{PASSWORD}@192.0.2.1:5432/svc"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, clean_env: None) -> Iterator[None]:
    """No OUTBOX_RELAY_* variable leaks in, nothing can connect, and logging is put back afterwards."""

    async def no_connection(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the command tried to connect to the database")

    monkeypatch.setattr("outbox_relay.db.connect_retrying", no_connection)
    monkeypatch.setattr("asyncpg.connect", no_connection)

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("arq", "asyncio")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of ``parser`` by command name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no sub-commands")


def assert_one_line_naming(err: str, variable: str) -> None:
    """stderr is exactly one line, it names ``variable`` and holds no traceback or secret."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert variable in lines[0]
    assert "Traceback" not in err
    assert PASSWORD not in err


# -- the parser -------------------------------------------------------------------------


def test_parser_knows_every_contract_command() -> None:
    """Each command of the contract is a sub-command bound to a handler function."""
    parser = cli.build_parser()
    assert set(subcommands(parser)) >= CONTRACT_COMMANDS
    for name in CONTRACT_COMMANDS:
        args = parser.parse_args([name])
        assert args.name == name
        assert callable(args.command)
    handlers = {parser.parse_args([name]).command for name in CONTRACT_COMMANDS}
    assert len(handlers) == len(CONTRACT_COMMANDS), "two commands share one handler"


def test_unknown_or_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """No command, or an unknown one, exits 2 (argparse's usage error)."""
    for argv in ([], ["bogus"]):
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_the_operator_cli_has_no_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`bench` and `bench-noop-worker` are unknown commands (exit 2): the benchmark is `./dev bench`."""
    assert not {"bench", "bench-noop-worker"} & set(subcommands(cli.build_parser()))
    for name in ("bench", "bench-noop-worker"):
        with pytest.raises(SystemExit) as caught:
            cli.main([name])
        assert caught.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_status_has_a_json_flag() -> None:
    """status --json sets json; plain status does not."""
    parser = cli.build_parser()
    assert parser.parse_args(["status", "--json"]).json is True
    assert parser.parse_args(["status"]).json is False


def test_worker_has_a_burst_flag() -> None:
    """worker --burst sets burst; plain worker does not."""
    parser = cli.build_parser()
    assert parser.parse_args(["worker", "--burst"]).burst is True
    assert parser.parse_args(["worker"]).burst is False


def test_requeue_correlation_id_is_repeatable() -> None:
    """requeue --correlation-id can be given several times and keeps every id in order."""
    parser = cli.build_parser()
    args = parser.parse_args(["requeue", "--correlation-id", "a", "--correlation-id", "b:1"])
    assert args.correlation_id == ["a", "b:1"]
    assert args.all_failed is False
    assert parser.parse_args(["requeue", "--all-failed"]).all_failed is True


def test_migrate_has_a_primary_flag() -> None:
    """migrate --primary selects the producer schema; plain migrate the service database."""
    parser = cli.build_parser()
    assert parser.parse_args(["migrate", "--primary"]).primary is True
    assert parser.parse_args(["migrate"]).primary is False


# -- exit code 2, before any connection --------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["requeue"], ["requeue", "--all-failed", "--correlation-id", "x"]], ids=["neither", "both"]
)
def test_requeue_without_a_selection_is_usage_error_before_connecting(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """requeue with neither (or both) of --correlation-id/--all-failed returns 2 at once, never connecting."""
    monkeypatch.setenv("OUTBOX_RELAY_DATABASE_URL", UNREACHABLE_URL)
    started = time.monotonic()
    assert cli.main(argv) == 2
    assert time.monotonic() - started < 1.0
    err = capsys.readouterr().err
    assert_one_line_naming(err, "--all-failed")
    assert "--correlation-id" in err


def test_status_without_database_url_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """status with no DATABASE_URL returns 2 with one stderr line naming OUTBOX_RELAY_DATABASE_URL."""
    assert cli.main(["status"]) == 2
    captured = capsys.readouterr()
    assert_one_line_naming(captured.err, "OUTBOX_RELAY_DATABASE_URL")
    assert captured.out == ""


@pytest.mark.parametrize("argv", [["run"], ["worker"], ["migrate"], ["requeue", "--all-failed"]])
def test_commands_needing_the_service_database_name_it_when_missing(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command that needs DATABASE_URL exits 2 naming it when it is not set."""
    assert cli.main(argv) == 2
    assert_one_line_naming(capsys.readouterr().err, "OUTBOX_RELAY_DATABASE_URL")


def test_migrate_primary_without_primary_url_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """migrate --primary with no PRIMARY_URL exits 2 naming OUTBOX_RELAY_PRIMARY_URL."""
    monkeypatch.setenv("OUTBOX_RELAY_DATABASE_URL", UNREACHABLE_URL)
    assert cli.main(["migrate", "--primary"]) == 2
    assert_one_line_naming(capsys.readouterr().err, "OUTBOX_RELAY_PRIMARY_URL")


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_run_with_a_bad_sweep_interval_names_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """run with OUTBOX_RELAY_SWEEP_INTERVAL=0 (or negative, or not a number) returns 2 naming it."""
    monkeypatch.setenv("OUTBOX_RELAY_DATABASE_URL", UNREACHABLE_URL)
    monkeypatch.setenv("OUTBOX_RELAY_SWEEP_INTERVAL", value)
    started = time.monotonic()
    assert cli.main(["run"]) == 2
    assert time.monotonic() - started < 1.0
    assert_one_line_naming(capsys.readouterr().err, "OUTBOX_RELAY_SWEEP_INTERVAL")


def test_run_with_a_bad_sweep_interval_flag_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The --sweep-interval flag is validated like the variable and the message names the variable."""
    monkeypatch.setenv("OUTBOX_RELAY_DATABASE_URL", UNREACHABLE_URL)
    assert cli.main(["run", "--sweep-interval", "0"]) == 2
    assert_one_line_naming(capsys.readouterr().err, "OUTBOX_RELAY_SWEEP_INTERVAL")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_RELAY_MAX_ATTEMPTS", "0"),
        ("OUTBOX_RELAY_REQUEUE_AFTER", "0"),
        ("OUTBOX_RELAY_REDIS_URL", "http://cache.example/0"),
        ("OUTBOX_RELAY_DATABASE_URL", f"mysql://root:{PASSWORD}@db.example/app"),
    ],
)
def test_worker_with_an_invalid_setting_names_the_variable(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any invalid setting makes worker exit 2 at once, naming the variable and showing no secret."""
    monkeypatch.setenv("OUTBOX_RELAY_DATABASE_URL", UNREACHABLE_URL)
    monkeypatch.setenv(variable, value)
    assert cli.main(["worker"]) == 2
    assert_one_line_naming(capsys.readouterr().err, variable)


def test_worker_with_an_unimportable_handler_module_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A HANDLER_MODULES entry that cannot be imported exits 2 naming OUTBOX_RELAY_HANDLER_MODULES."""
    monkeypatch.setenv("OUTBOX_RELAY_DATABASE_URL", UNREACHABLE_URL)
    monkeypatch.setenv("OUTBOX_RELAY_HANDLER_MODULES", "json, no_such_module_xyz")
    assert cli.main(["worker"]) == 2
    err = capsys.readouterr().err
    assert_one_line_naming(err, "OUTBOX_RELAY_HANDLER_MODULES")
    assert "no_such_module_xyz" in err
