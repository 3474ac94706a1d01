"""The one exception hierarchy of outbox_relay.

The CLI (``outbox_relay.cli``, the one error boundary) maps these to exit codes:
:class:`SettingsError` and :class:`UsageError` exit 2, every other
:class:`OutboxRelayError` exits 1 with its message. Handlers raise
:class:`PermanentError` for an event that can never succeed; anything else they
raise is treated as transient and retried.
"""

from __future__ import annotations


class OutboxRelayError(Exception):
    """Base class of every error outbox_relay raises on purpose."""


# -- bad input: exit 2 ---------------------------------------------------------------


class SettingsError(OutboxRelayError):
    """A setting is missing or invalid; the message names the environment variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"invalid setting {variable}: {problem}")
        self.variable = variable
        self.problem = problem


class UsageError(OutboxRelayError):
    """The command line asks for something that cannot be done as asked."""


# -- the database's schema and replication -----------------------------------------------


class MigrationError(OutboxRelayError):
    """A migration could not be applied, or the schema is older than this code."""


class ReplicationError(OutboxRelayError):
    """Setting up or tearing down the subscription failed."""


# -- servers -----------------------------------------------------------------------------


class UnavailableError(OutboxRelayError):
    """A server (PostgreSQL, Redis, a broker) could not be reached in the time allowed."""


class ConnectionLostError(UnavailableError):
    """The relay's listener connection is gone (or stopped answering); notifications may be lost."""


class LeadershipLostError(OutboxRelayError):
    """This relay's lease expired or another relay took it over: it must stop writing and stand by."""


class QueueError(OutboxRelayError):
    """The queue refused an operation (its server answered with an error)."""


class QueueUnavailable(QueueError, UnavailableError):
    """The queue's server cannot be reached (connection refused, reset or timed out)."""


# -- retention ---------------------------------------------------------------------------


class PruneError(OutboxRelayError):
    """`prune` could not be done safely; nothing unsafe was deleted."""


class NoSubscriberError(PruneError):
    """The primary has no logical replication slot: no subscriber is attached."""


class SubscriberLagError(PruneError):
    """A slot did not confirm the candidate rows in time; that round's rows were kept."""

    def __init__(self, message: str, *, lagging: list[str], pruned: int) -> None:
        super().__init__(message)
        self.lagging = lagging
        self.pruned = pruned


# -- handlers ------------------------------------------------------------------------------


class PermanentError(OutboxRelayError):
    """The event can never be applied as it is (bad kind, outcome or payload, no reservation).

    The worker marks the row ``failed`` at once with this message as ``last_error``.
    """


class TransientError(OutboxRelayError):
    """The event could not be applied now but may be later (a broker away, a 503).

    Any exception a handler raises other than :class:`PermanentError` is retried;
    this one also lets the handler ask for a retry no sooner than ``retry_after``
    seconds (an HTTP ``Retry-After``): the worker waits the longer of that and
    its backoff.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownKindError(PermanentError):
    """No handler is registered for the event's ``kind``."""


class PluginError(OutboxRelayError):
    """A plugin (domain or sink) could not be loaded or is malformed."""


# -- developer tools (demo, embedded servers) -----------------------------------------------


class EmbeddedServerError(OutboxRelayError):
    """An embedded PostgreSQL or Redis could not be started or driven."""


class DemoError(OutboxRelayError):
    """The demo could not complete (a process exited, the flow stalled)."""
