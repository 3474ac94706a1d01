"""Queue backends chosen by the URL's scheme: ``redis://`` → the arq adapter, ``memory://`` → in memory.

A backend is published under the entry-point group ``outbox_relay.queues``, one
entry per URL scheme it serves, pointing at a :data:`BackendFactory`; adding a
backend is one module plus its entry points. The composition root calls
:func:`from_url` once; nothing else names a backend. A factory may also have ``check_url(url)``,
raising ``ValueError`` for a URL of its scheme it cannot take: settings validation calls it (exit 2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol
from urllib.parse import urlsplit

from outbox_relay.exceptions import SettingsError
from outbox_relay.queue import Consumer, Diagnosable, Queue

#: The entry-point group queue backends are published under (name = URL scheme).
ENTRY_POINT_GROUP = "outbox_relay.queues"


@dataclass(frozen=True)
class QueueOptions:
    """What every backend is told, whatever it is: the queue, its job ids' namespace, and how a
    producer packs rows and a consumer runs jobs."""

    queue_name: str
    namespace: str
    #: Rows one job carries at most (producer side).
    batch_size: int = 50
    #: Jobs one consumer runs at once.
    concurrency: int = 32
    #: How often a consumer with every slot taken looks for a free one (seconds).
    poll_delay: float = 0.01
    #: Time one job may take (seconds).
    job_timeout: float = 10.0
    #: Longest an idle consumer blocks on the relay's wake-up (seconds).
    idle_wait: float = 1.0
    #: The service database's identity (:attr:`outbox_relay.identity.DatabaseIdentity.token`): a
    #: producer stamps every job with it, a consumer refuses a job stamped with another ("": neither).
    identity: str = ""


class QueueBackend(Protocol):
    """One queue server as the relay, the workers and `doctor` see it."""

    #: What to call the server in messages and health reasons ("Redis", "the in-memory queue").
    @property
    def name(self) -> str: ...

    def producer(self) -> Queue:
        """The relay's side (hand over, depth, epoch)."""
        ...

    def consumer(self) -> Consumer:
        """A worker's side (run jobs)."""
        ...

    def diagnostics(self) -> Diagnosable:
        """What `doctor` asks of the server."""
        ...


#: A backend's entry point: the queue URL (a secret) and the options give the backend.
BackendFactory = Callable[[str, QueueOptions], QueueBackend]


@functools.cache
def _factories() -> dict[str, Callable[[], BackendFactory]]:
    return {ep.name: ep.load for ep in entry_points(group=ENTRY_POINT_GROUP)}


def schemes() -> tuple[str, ...]:
    """Every URL scheme an installed backend serves, sorted."""
    return tuple(sorted(_factories()))


def from_url(url: str, options: QueueOptions, *, variable: str = "the queue URL") -> QueueBackend:
    """The backend serving ``url``'s scheme; an unknown scheme, or a URL its backend refuses
    (a ``ValueError`` when made), is a :class:`SettingsError`."""
    scheme = urlsplit(url).scheme
    factory = _factories().get(scheme)
    if factory is None:
        known = ", ".join(s + "://" for s in schemes()) or "none installed"
        raise SettingsError(variable, f"no queue backend serves {scheme}:// (known: {known})")
    try:
        return factory()(url, options)
    except ValueError as exc:
        raise SettingsError(variable, str(exc)) from None


def check(url: str) -> None:
    """A ``ValueError`` when the backend serving ``url``'s scheme refuses its form: the factory's
    ``check_url(url)``, if it has one (settings validation; nothing is made or connected)."""
    factory = _factories().get(urlsplit(url).scheme)
    validate = getattr(factory(), "check_url", None) if factory is not None else None
    if callable(validate):
        validate(url)
