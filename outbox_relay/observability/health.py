"""Liveness and readiness of one process, as ``/healthz`` and ``/readyz`` report them.

Liveness is about *progress*: each long-running loop registers a heartbeat
with a deadline and beats every time it turns over. ``/healthz`` is 503 as
soon as one loop has not beaten within its deadline (a liveness probe then
restarts the process). A loop that is blocked waiting on a server it cannot
reach is still alive — it is retrying, which is readiness, not liveness — and
says so with :meth:`Health.waiting`.

Readiness is set by the owner (the relay or the worker), with the reasons it is
not ready and its role (``active`` / ``standby`` / ``worker``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Loop:
    deadline: float
    last_beat: float
    #: What the loop is waiting on (a server it retries), while it does; nesting counts.
    waiting_on: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Liveness:
    """The answer of ``/healthz``: ``ok`` unless a loop is stuck."""

    ok: bool
    stuck: list[str]
    loops: dict[str, dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "stuck": self.stuck, "loops": self.loops}


@dataclass(frozen=True)
class Readiness:
    """The answer of ``/readyz``."""

    ready: bool
    reasons: list[str]
    role: str | None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ready": self.ready}
        if self.role is not None:
            body["role"] = self.role
        if not self.ready:
            body["reasons"] = self.reasons
        return body


class Health:
    """Heartbeats of named loops (liveness) and the owner's readiness.

    Everything runs on one event loop; nothing here blocks or awaits.
    ``clock`` is injectable for tests (monotonic seconds).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._loops: dict[str, _Loop] = {}
        self._ready = False
        self._reasons: list[str] = ["starting"]
        self._role: str | None = None

    # -- liveness ---------------------------------------------------------------

    def register(self, name: str, deadline: float) -> None:
        """Watch loop ``name``: it must beat at least every ``deadline`` seconds (counts from now)."""
        if not deadline > 0:
            raise ValueError("a heartbeat deadline must be > 0")
        self._loops[name] = _Loop(deadline=deadline, last_beat=self._clock())

    def unregister(self, name: str) -> None:
        """Stop watching ``name`` (the loop ended on purpose, e.g. a relay left its active role)."""
        self._loops.pop(name, None)

    def beat(self, name: str, deadline: float | None = None) -> None:
        """Loop ``name`` turned over. An unknown name is registered (``deadline`` is then required)."""
        loop = self._loops.get(name)
        if loop is None:
            if deadline is None:
                raise KeyError(f"heartbeat {name!r} is not registered (pass a deadline)")
            self.register(name, deadline)
            return
        loop.last_beat = self._clock()
        if deadline is not None:
            loop.deadline = deadline

    @contextlib.contextmanager
    def waiting(self, name: str, on: str) -> Iterator[None]:
        """Inside this block loop ``name`` waits on ``on`` (e.g. ``"Redis"``) and counts as alive.

        Use it around a retry-forever wait for an unreachable server: the loop is
        not stuck, it is not ready. Leaving the block counts as a beat.
        """
        loop = self._loops.get(name)
        if loop is None:
            raise KeyError(f"heartbeat {name!r} is not registered")
        loop.waiting_on.append(on)
        try:
            yield
        finally:
            loop.waiting_on.remove(on)
            loop.last_beat = self._clock()

    def liveness(self) -> Liveness:
        """Which loops are stuck: not waiting on a server, and silent for longer than their deadline."""
        now = self._clock()
        stuck: list[str] = []
        loops: dict[str, dict[str, Any]] = {}
        for name, loop in sorted(self._loops.items()):
            age = now - loop.last_beat
            alive = bool(loop.waiting_on) or age <= loop.deadline
            if not alive:
                stuck.append(name)
            loops[name] = {
                "alive": alive,
                "seconds_since_beat": round(age, 3),
                "deadline_seconds": loop.deadline,
                "waiting_on": loop.waiting_on[-1] if loop.waiting_on else None,
            }
        return Liveness(ok=not stuck, stuck=stuck, loops=loops)

    # -- readiness --------------------------------------------------------------

    def set_ready(self, ready: bool, *, reasons: Sequence[str] = (), role: str | None = None) -> None:
        """Set readiness; ``reasons`` say why not (kept only while not ready); ``role`` stays
        as it was when None."""
        self._ready = ready
        self._reasons = [] if ready else (list(reasons) or ["not ready"])
        if role is not None:
            self._role = role

    def readiness(self) -> Readiness:
        return Readiness(ready=self._ready, reasons=list(self._reasons), role=self._role)
