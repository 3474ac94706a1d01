"""Relay and worker processes (the real CLI) that the bench starts and stops, and their CPU and memory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from bench import BenchError
from outbox_relay.devtools import processes

#: The directory that holds the ``bench`` package: the no-op workers import it from there.
ROOT = Path(__file__).resolve().parent.parent


def tree_cpu(pid: int, *, include_reaped: bool) -> float:
    """CPU seconds of a process and its live children (and its reaped ones, if asked)."""
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system
        if include_reaped:
            total += times.children_user + times.children_system
        for child in root.children(recursive=True):
            try:
                t = child.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` of this machine (None: none, or not ours to see)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    listening = (c for c in connections if c.status == psutil.CONN_LISTEN and c.laddr)
    return next((c.pid for c in listening if getattr(c.laddr, "port", None) == port), None)


def rss(pid: int) -> int:
    """Resident memory of a process in bytes (0 once it is gone)."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


class Fleet:
    """Relay and worker processes (the real CLI), started and stopped by the bench."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.relay: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._cpu_done: dict[str, float] = {"relay": 0.0, "workers": 0.0}

    @contextlib.contextmanager
    def extra_env(self, env: dict[str, str]) -> Iterator[None]:
        """Processes started in the block also get ``env``."""
        saved = dict(self.env)
        self.env.update(env)
        try:
            yield
        finally:
            self.env.clear()
            self.env.update(saved)

    def start(self, workers: int, *, relay: bool = True, noop: bool = False) -> None:
        """Start the relay (if ``relay``) and ``workers`` workers (the no-op ones if ``noop``)."""
        if relay:
            self.relay = self._spawn(["-m", "outbox_relay", "run"], "relay")
        args = ["-m", "bench.noop_worker"] if noop else ["-m", "outbox_relay", "worker"]
        for index in range(workers):
            self.workers.append(self._spawn(args, f"worker-{index}"))

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        path = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p)
        return processes.spawn(args, {**self.env, "PYTHONPATH": path}, self.workdir / f"{name}.log")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the relay and of the workers together (stopped ones included)."""
        out = dict(self._cpu_done)
        if self.relay is not None:
            out["relay"] += tree_cpu(self.relay.pid, include_reaped=False)
        out["workers"] += sum(tree_cpu(p.pid, include_reaped=False) for p in self.workers)
        return out

    def relay_rss(self) -> int:
        """The relay's resident memory."""
        return 0 if self.relay is None else rss(self.relay.pid)

    def worker_rss(self) -> int:
        """The largest worker's resident memory."""
        return max((rss(p.pid) for p in self.workers), default=0)

    def idle_cpu(self, seconds: float) -> dict[str, float]:
        """Percent of one core the relay and each worker use over ``seconds`` (nothing to do)."""
        procs = {"relay": self.relay} if self.relay is not None else {}
        procs.update({f"worker {i}": p for i, p in enumerate(self.workers)})
        before = {k: tree_cpu(p.pid, include_reaped=False) for k, p in procs.items()}
        start = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - start
        return {
            k: 100 * (tree_cpu(p.pid, include_reaped=False) - before[k]) / elapsed for k, p in procs.items()
        }

    def check_alive(self) -> None:
        """Raise :class:`BenchError` with the logs' tails if a process exited."""
        for proc in [p for p in [self.relay, *self.workers] if p is not None]:
            if proc.poll() is not None:
                logs = processes.log_tails(self.workdir, lines=10)
                raise BenchError(f"a bench process exited (code {proc.returncode})\n{logs}")

    def stop_relay(self) -> None:
        """Stop the relay alone (the workers keep running, idle)."""
        if self.relay is None:
            return
        cpu = self.cpu_seconds()
        processes.stop([self.relay])
        self._cpu_done["relay"] = cpu["relay"]
        self.relay = None

    def stop(self) -> None:
        """Stop every process, keeping the CPU they used in the totals."""
        cpu = self.cpu_seconds()
        processes.stop(p for p in [self.relay, *self.workers] if p is not None)
        self._cpu_done = {"relay": cpu["relay"], "workers": cpu["workers"]}
        self.relay = None
        self.workers = []
