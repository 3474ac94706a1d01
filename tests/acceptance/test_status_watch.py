"""`status --watch` as an operator sees it: under a pseudo-terminal, piped, Ctrl-C, a lost connection."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from outbox_relay.composition import replication_config
from outbox_relay.replication import subscribe
from outbox_relay.terminal import escape_controls
from tests.conftest import OutboxEnv
from tests.helpers import REPO, cli_env, produce

#: CSI and OSC sequences (what rich writes to move the cursor and style text).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-B]")


def visible(raw: bytes) -> str:
    """The text of terminal output without its escape sequences."""
    return _ANSI.sub("", raw.decode(errors="replace")).replace("\r", "")


class Terminal:
    """``status --watch`` running on a pseudo-terminal of 160 x 50, its output kept as it comes."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "outbox_relay", "status", "--watch", *args],
            env={**env, "TERM": "xterm-256color"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=REPO,
            start_new_session=True,
        )
        os.close(slave)
        self.raw = b""

    def _read_some(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += chunk
        return bool(chunk)

    def mark(self) -> int:
        """Where the output is now (for :meth:`wait_for` ``since``)."""
        return len(self.raw)

    def wait_for(self, found: Callable[[str], bool], *, since: int = 0, timeout: float = 30.0) -> str:
        """Read until ``found`` holds for the visible text after ``since``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            text = visible(self.raw[since:])
            if found(text):
                return text
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.process.poll() is not None and not self._read_some(0)):
                raise AssertionError(f"timed out waiting on the screen; it shows:\n{text[-3000:]}")
            self._read_some(min(remaining, 0.5))

    def interrupt(self, timeout: float = 15.0) -> int:
        """Ctrl-C: SIGINT, then the exit code (reading the rest of the output)."""
        self.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read_some(0.2)
        while self._read_some(0):
            pass
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    """Terminals opened by one test, closed (their process killed) at its end."""
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


def row_shows(name: str, count: int) -> Callable[[str], bool]:
    """The status table has a line ``name  count``."""
    pattern = re.compile(rf"^\s*{name}\s+{count}\b", re.M)
    return lambda text: bool(pattern.search(text))


def all_of(*checks: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda text: all(check(text) for check in checks)


async def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(function, *args, **kwargs)


async def test_watch_on_a_terminal_refreshes_counts_and_ends_cleanly_on_ctrl_c(
    outbox_env: OutboxEnv, service: Any, terminals: list[Terminal]
) -> None:
    """Under a pty the view shows the counts, shows new rows in a later refresh, and Ctrl-C exits 0."""
    for i in range(3):
        await produce(service, f"w-{i}")
    await service.execute(
        "UPDATE outbox_relay.outbox SET status = 'finished', finished_at = now() WHERE correlation_id = 'w-0'"
    )
    terminal = Terminal(cli_env(outbox_env.env()), "--interval", "0.2")
    terminals.append(terminal)
    first = await in_thread(
        terminal.wait_for, all_of(row_shows("new", 2), row_shows("finished", 1), row_shows("failed", 0))
    )
    assert "oldest pending:" in first
    assert "replication: no subscription" in first

    mark = terminal.mark()
    for i in range(3, 8):
        await produce(service, f"w-{i}")
    await service.execute(
        "UPDATE outbox_relay.outbox SET status = 'finished', finished_at = now() WHERE correlation_id = 'w-1'"
    )
    later = await in_thread(
        terminal.wait_for, all_of(row_shows("new", 6), row_shows("finished", 2)), since=mark
    )
    assert re.search(r"^\s*all \(arrived\)\s+8\b", later, re.M), later

    code = await in_thread(terminal.interrupt)
    output = terminal.raw.decode(errors="replace")
    assert code == 0, visible(terminal.raw)[-2000:]
    assert "Traceback" not in output
    assert output.rstrip().endswith("\x1b[?25h") or "\x1b[?25h" in output[-200:], repr(output[-200:])


async def test_watch_escapes_control_characters_and_markup_from_rows(
    outbox_env: OutboxEnv, service: Any, terminals: list[Terminal]
) -> None:
    """A failed row's id and error holding ESC, a bidi override (issue 15.5) or rich markup are shown
    escaped and literal."""
    evil_id = "evil\x1b[31mred"
    markup_id = "m-[bold]x[/bold]"
    bidi_id = "pay-\u202edsu-001"
    for cid in (evil_id, markup_id, bidi_id):
        await produce(service, cid)
    await service.execute(
        "UPDATE outbox_relay.outbox SET status = 'failed', attempts = 1,"
        " last_error = 'boom \x1b[2J [red]not red[/red]', finished_at = now()"
    )
    terminal = Terminal(cli_env(outbox_env.env()), "--interval", "0.2")
    terminals.append(terminal)
    text = await in_thread(
        terminal.wait_for,
        lambda t: (
            escape_controls(evil_id) in t
            and markup_id in t
            and "[red]not red[/red]" in t
            and "pay-\\u202edsu-001" in t
        ),
    )
    assert "\u202e".encode() not in terminal.raw
    assert "boom \\x1b[2J" in text
    assert evil_id.encode() not in terminal.raw
    assert b"\x1b[2J" not in terminal.raw
    assert await in_thread(terminal.interrupt) == 0


async def test_watch_shows_a_lost_connection_and_reconnects(
    outbox_env: OutboxEnv, service: Any, terminals: list[Terminal]
) -> None:
    """When its backend is terminated the view says so, reconnects and goes on showing the counts."""
    await produce(service, "r-1")
    terminal = Terminal(cli_env(outbox_env.env()), "--interval", "0.2")
    terminals.append(terminal)
    await in_thread(terminal.wait_for, row_shows("new", 1))
    mark = terminal.mark()
    killed = await service.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name LIKE 'outbox_relay%' AND datname = current_database()"
        " AND pid <> pg_backend_pid()"
    )
    assert killed == 1
    await in_thread(terminal.wait_for, lambda t: "connection lost" in t, since=mark)
    mark = terminal.mark()
    await produce(service, "r-2")
    await in_thread(
        terminal.wait_for, lambda t: row_shows("new", 2)(t) and "connection lost" not in t, since=mark
    )
    assert terminal.process.poll() is None
    assert await in_thread(terminal.interrupt) == 0


async def test_watch_piped_prints_one_plain_line_per_refresh(outbox_env: OutboxEnv, service: Any) -> None:
    """With stdout not a terminal, each refresh is one plain line without escape sequences; SIGINT exits 0."""
    await produce(service, "p-1")
    process = subprocess.Popen(
        [sys.executable, "-m", "outbox_relay", "status", "--watch", "--interval", "0.2"],
        env=cli_env(outbox_env.env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        lines = [await asyncio.to_thread(process.stdout.readline) for _ in range(3)]
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert b"Traceback" not in err
    for line in lines:
        text = line.decode()
        assert "\x1b" not in text
        assert " new=1 queued=0 finished=0 failed=0 rows=1 " in text, text
        assert "oldest_pending=" in text
    assert "arrived/s=0.0" in lines[-1].decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--interval", "0.01"), "--interval"),
        (("--interval", "61"), "--interval"),
        (("--interval", "nan"), "--interval"),
        (("--json",), "--json"),
    ],
)
def test_watch_refuses_bad_flags(args: tuple[str, ...], message: str) -> None:
    """An interval out of 0.2..60 s, or --json with --watch, exits 2 with one line naming the flag."""
    result = subprocess.run(
        [sys.executable, "-m", "outbox_relay", "status", "--watch", *args],
        env=cli_env({"OUTBOX_RELAY_DATABASE_URL": "postgresql://u@127.0.0.1:1/db"}),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert result.returncode == 2, result
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_watch_shows_the_subscription_and_replicated_rows(
    outbox_env: OutboxEnv, service: Any, primary: Any, terminals: list[Terminal]
) -> None:
    """Replicated: the view shows the subscription enabled with its lag, and rows committed on the primary."""
    await subscribe(replication_config(outbox_env.settings()))
    terminal = Terminal(cli_env(outbox_env.env()), "--interval", "0.2")
    terminals.append(terminal)
    await in_thread(terminal.wait_for, lambda t: re.search(r"replication: enabled, (lag \d|no apply)", t))
    mark = terminal.mark()
    for i in range(4):
        await produce(primary, f"rep-{i}")
    text = await in_thread(terminal.wait_for, row_shows("new", 4), since=mark)
    assert re.search(r"replication: enabled, lag \d+\.\d s, apply errors 0, sync errors 0", text), text
    assert await in_thread(terminal.interrupt) == 0
