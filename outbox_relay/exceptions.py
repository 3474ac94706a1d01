"""The one exception hierarchy of outbox_relay.

The CLI maps these to exit codes: :class:`SettingsError` and
:class:`UsageError` exit 2, every other :class:`OutboxRelayError` exits 1.
Handlers raise :class:`PermanentError` for an event that can never succeed;
anything else they raise is treated as transient and retried.
"""

from __future__ import annotations


class OutboxRelayError(Exception):
    """Base class of every error outbox_relay raises on purpose."""


class SettingsError(OutboxRelayError):
    """A setting is missing or invalid; the message names the environment variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"invalid setting {variable}: {problem}")
        self.variable = variable
        self.problem = problem


class UsageError(OutboxRelayError):
    """The command line asks for something that cannot be done as asked."""


class MigrationError(OutboxRelayError):
    """A migration could not be applied, or the schema is older than this code."""


class ReplicationError(OutboxRelayError):
    """Setting up or tearing down the subscription failed."""


class UnavailableError(OutboxRelayError):
    """A server (PostgreSQL or Redis) could not be reached in the time allowed."""


class PermanentError(OutboxRelayError):
    """The event can never be applied as it is (bad kind, outcome or payload, no reservation).

    The worker marks the row ``failed`` at once with this message as ``last_error``.
    """


class UnknownKindError(PermanentError):
    """No handler is registered for the event's ``kind``."""
