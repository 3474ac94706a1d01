"""Test hosts in network namespaces: a process on "another host" whose network can be cut.

A :class:`Host` is a network namespace joined to the root namespace by a veth
pair with addresses of the tests' own making (``10.231.X.1`` root side,
``10.231.X.2`` host side, a /30 on the veth only; nothing is routed anywhere
else: a blackhole route of the same /30 catches whatever the veth's own route
does not). The servers the tests use listen on 127.0.0.1 only; a host reaches
each through a small TCP forwarder bound to the root-side address
(:meth:`Host.reach` rewrites a URL, :meth:`Host.environment` every
``OUTBOX_RELAY_*_URL`` of an environment), running on a thread of its own so
that nothing the test does can stall it.

:meth:`Host.cut` sets the host's own end of the veth down, as a host whose
network vanished: every socket stays open on both sides (checked: both ends
stay ``ESTABLISHED``; the root side keeps its route, flagged ``linkdown``, and
the veth drops what is sent to it), so the servers keep that host's sessions,
transactions and locks until TCP notices, and the forwarders keep their
upstream connections. (Setting the *root* end down instead would remove the
root side's route and send the host's packets to the default gateway.)
:meth:`Host.restore` brings it back and the same connections go on.

Everything is undone on exit, a failing test included: the host's processes
killed, the forwarders and every connection through them closed (the servers'
sessions of the host end), the veth, the route and the namespace deleted.
Where namespaces cannot be made (not root, no iproute2, no kernel support)
:func:`netns_unavailable` says why in one line and the tests skip with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from outbox_relay.devtools.embedded import free_port
from tests.helpers import Service, Services

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The private /16 the hosts' /30s are taken from (never routed beyond this machine).
PREFIX = "10.231"
#: Names of our namespaces and links start with this (a link name holds at most 15 characters).
NAME = "orh"
LOOPBACK = ("127.0.0.1", "localhost")
REPO = Path(__file__).resolve().parent.parent


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (inside ``netns`` when given)."""
    prefix = ["ip", "netns", "exec", netns, "ip"] if netns else ["ip"]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (one line), or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no iproute2 (`ip`): apt-get install iproute2"
    probe = f"{NAME}-probe-{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()[:160]}"
    ip("netns", "delete", probe, check=False)
    return None


@dataclass
class Forwarder:
    """One listening socket on the root-side address, forwarding each connection to a loopback port."""

    target: tuple[str, int]
    server: asyncio.Server | None = None
    port: int = 0
    #: Open pairs: (host-side writer, upstream writer, upstream local port).
    pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, int]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, address: str) -> None:
        self.server = await asyncio.start_server(self._accept, address, 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pair = (writer, up_writer, int(up_writer.get_extra_info("sockname")[1]))
        self.pairs.append(pair)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self.pairs.remove(pair)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for down, up, _ in list(self.pairs):
            down.transport.abort()
            up.transport.abort()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side ends, then close the writer (the other direction ends with it)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class Host:
    """A network namespace with a veth link to the root namespace and forwarders to loopback servers."""

    def __init__(self, subnet: int) -> None:
        self.subnet = subnet
        self.netns = f"{NAME}-{subnet}"
        self.root_link = f"{NAME}{subnet}r"
        self.host_link = f"{NAME}{subnet}h"
        self.root_address = f"{PREFIX}.{subnet}.1"
        self.address = f"{PREFIX}.{subnet}.2"
        self.cut_now = False
        self.processes: list[subprocess.Popen[bytes]] = []
        self._forwarders: dict[tuple[str, int], Forwarder] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"forwarders-{subnet}", daemon=True
        )

    # -- making and unmaking ------------------------------------------------------------

    def claim(self) -> bool:
        """Make the namespace; False when it exists already (another run owns this subnet)."""
        made = ip("netns", "add", self.netns, check=False)
        if made.returncode != 0 and "exist" in made.stderr:
            return False
        made.check_returncode()
        return True

    def create(self) -> None:
        """The veth pair, addresses, blackhole route for the /30, links up, the forwarders' thread
        (after :meth:`claim`)."""
        self._thread.start()
        ip("link", "add", self.root_link, "type", "veth", "peer", "name", self.host_link)
        ip("link", "set", self.host_link, "netns", self.netns)
        ip("addr", "add", f"{self.root_address}/30", "dev", self.root_link)
        ip("route", "add", "blackhole", f"{PREFIX}.{self.subnet}.0/30", "metric", "4000")
        ip("link", "set", self.root_link, "up")
        ip("addr", "add", f"{self.address}/30", "dev", self.host_link, netns=self.netns)
        ip("link", "set", "lo", "up", netns=self.netns)
        ip("link", "set", self.host_link, "up", netns=self.netns)

    def close(self) -> None:
        """Undo everything, in the order that leaves no packet of ours going anywhere else: the link
        back (so the host's processes may close their sockets), the processes killed, the forwarders
        and their connections closed, then the veth, the route and the namespace deleted."""
        with contextlib.suppress(subprocess.SubprocessError):
            self.restore()
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(self._close_forwarders(), 10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
        ip("link", "delete", self.root_link, check=False)
        ip("route", "delete", "blackhole", f"{PREFIX}.{self.subnet}.0/30", "metric", "4000", check=False)
        gone = ip("netns", "delete", self.netns, check=False)
        if gone.returncode != 0:
            logger.warning("network host not deleted", extra={"netns": self.netns, "error": gone.stderr})

    async def _close_forwarders(self) -> None:
        for forwarder in self._forwarders.values():
            await forwarder.close()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the forwarders' thread; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- reaching the root namespace's loopback servers ---------------------------------

    def forward(self, port: int, host: str = "127.0.0.1") -> int:
        """The root-side port (on :attr:`root_address`) that forwards to ``host:port``."""
        key = (host, port)
        if key not in self._forwarders:
            forwarder = Forwarder(key)
            self._run(forwarder.start(self.root_address))
            self._forwarders[key] = forwarder
        return self._forwarders[key].port

    def reach(self, url: str) -> str:
        """``url`` as this host reaches it: a loopback host and port become the forwarder's."""
        parts = urlsplit(url)
        if parts.hostname not in LOOPBACK or parts.port is None:
            return url
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{self.root_address}:{self.forward(parts.port)}"
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}" if userinfo else netloc))

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with every ``OUTBOX_RELAY_*_URL`` that names a loopback server rewritten by
        :meth:`reach`, and the HTTP server of a process bound to this host's address."""
        moved = {k: self.reach(v) if k.endswith("_URL") else v for k, v in env.items()}
        moved["OUTBOX_RELAY_HTTP_HOST"] = self.address
        return moved

    def upstream_ports(self) -> set[int]:
        """Local ports of the forwarders' connections to the servers (a PostgreSQL session of this
        host has one of them as ``pg_stat_activity.client_port``)."""
        return {port for f in list(self._forwarders.values()) for _, _, port in list(f.pairs)}

    # -- processes on this host ---------------------------------------------------------

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace (``ip netns exec``), its output going to ``log``."""
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                env=dict(env),
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        self.processes.append(proc)
        return proc

    # -- the fault ----------------------------------------------------------------------

    def cut(self) -> None:
        """The host drops off the network: its end of the link goes down, every socket stays open."""
        ip("link", "set", self.host_link, "down", netns=self.netns)
        self.cut_now = True

    def restore(self) -> None:
        """The host's link comes back; the same connections go on."""
        if self.cut_now:
            ip("link", "set", self.host_link, "up", netns=self.netns)
            self.cut_now = False


def start_worker_on(host: Host, services: Services, name: str, env: Mapping[str, str]) -> Service:
    """Start ``python -m outbox_relay worker`` on ``host`` with ``env`` (a :func:`~tests.helpers.cli_env`)
    as that host reaches the servers, serving /readyz on the host's address; listed in ``services``
    (its log in the failure messages; :meth:`Services.ready` works on it)."""
    port = free_port()
    moved = {**host.environment(env), "OUTBOX_RELAY_HTTP_PORT": str(port)}
    log = services.directory / f"{name}.log"
    proc = host.spawn([sys.executable, "-m", "outbox_relay", "worker"], env=moved, log=log)
    service = Service(name, proc, log, port, host=host.address)
    services.started.append(service)
    return service


def _used_subnets() -> set[int]:
    """Third octets of 10.231.X addresses already on this machine (another run's hosts)."""
    listed = ip("-o", "-4", "addr", "show", check=False).stdout + ip("netns", "list", check=False).stdout
    used = set()
    for word in listed.replace("/", " ").split():
        if word.startswith(f"{PREFIX}.") and word.count(".") == 3:
            used.add(int(word.split(".")[2]))
        elif word.startswith(f"{NAME}-") and word[len(NAME) + 1 :].isdigit():
            used.add(int(word[len(NAME) + 1 :]))
    return used


@contextlib.contextmanager
def network_host() -> Iterator[Host]:
    """A fresh :class:`Host` on a free 10.231.X.0/30, torn down on exit whatever happened."""
    used = _used_subnets()
    candidates = [x for x in range(1, 255) if x not in used]
    random.shuffle(candidates)
    for subnet in candidates[:20]:
        host = Host(subnet)
        if not host.claim():
            continue  # taken meanwhile by another run: never touch what is not ours
        try:
            host.create()
        except BaseException as exc:
            host.close()
            if isinstance(exc, subprocess.CalledProcessError):
                detail = f"{' '.join(exc.cmd)}: {exc.stderr.strip()}"
                raise RuntimeError(f"cannot make a network host: {detail}") from exc
            raise
        try:
            yield host
        finally:
            host.close()
        return
    raise RuntimeError(f"no free {PREFIX}.X.0/30 for a network host")
