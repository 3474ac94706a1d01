"""The sink routes the bench measures: each a :class:`SinkRoute`, one small module per destination.

A route names the sink its ROUTES entry sends events to, and opens its
destination for one run (:meth:`SinkRoute.open`): a real local server made
ready to take the events (a JetStream stream, an exchange with a bound queue, a
receiver process), the environment the relay and workers need to reach it, and
a counter of the messages it holds, read after the run to check that every
event arrived exactly once. Leaving the block removes whatever the route set
up. A route whose server cannot be had raises :class:`Unavailable`; the bench
records it as skipped with that reason.

Adding a sink to the bench is one module like :mod:`bench.sinks.rabbitmq`: a
``route(...)`` returning a :class:`SinkRoute`, listed in :func:`measured`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

from bench.options import BenchOptions


class Unavailable(Exception):
    """The route's destination cannot be had here (its server does not answer, its extra is missing)."""


@dataclass(frozen=True)
class Destination:
    """A destination ready for one run: what the relay and workers need, and its message counter."""

    #: ``OUTBOX_RELAY_*`` variables of the sink (ROUTES is the bench's own).
    env: dict[str, str]
    #: Messages (or requests) the destination has received so far.
    count: Callable[[], Awaitable[int]]
    #: The port its server listens on (the CPU of the process listening there is reported too).
    port: int | None = None


@dataclass(frozen=True)
class SinkRoute:
    """One sink route of the bench."""

    #: Its key in the results (``"nats"``, ``"rabbitmq"``, …).
    name: str
    #: The sink that ROUTES names.
    sink: str
    #: What the printed progress calls it.
    label: str
    #: Open the destination for one run, in a scratch directory; closing removes what it set up.
    open: Callable[[Path, str], AbstractAsyncContextManager[Destination]] = field(repr=False)


def measured(options: BenchOptions) -> list[SinkRoute]:
    """The routes of the sinks table, in order."""
    from bench.sinks import kafka, nats, rabbitmq, webhook

    return [nats.route(), kafka.route(), rabbitmq.route(options.rabbitmq_url), webhook.route(delay_ms=0)]
