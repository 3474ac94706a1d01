"""Handlers, keyed by the outbox row's ``kind``, and the shipped ``reservation`` handler.

A handler is ``async def handler(conn, event) -> None``. The worker calls it
inside the transaction that then moves the row to ``finished``, so whatever
the handler writes through ``conn`` commits together with that move, or not
at all. A handler raises :class:`~outbox_relay.exceptions.PermanentError` for
an event that can never succeed; any other exception is retried.

Register your own kinds in a module named by ``OUTBOX_RELAY_HANDLER_MODULES``::

    from outbox_relay.handlers import registry

    @registry.register("email")
    async def send_email(conn, event): ...
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from outbox_relay.db import Connection, Pool
from outbox_relay.events import OutboxEvent, parse_payload
from outbox_relay.exceptions import PermanentError, UnknownKindError
from outbox_relay.sql import query

Handler = Callable[[Connection, OutboxEvent], Awaitable[None]]
#: Optional: a kind's common path done in one statement, claiming, applying and
#: finishing row ``row_id`` together. Returns False when the row needs the
#: general path (it is done already, is poison, or the usual case does not fit).
FastPath = Callable[[Pool, int], Awaitable[bool]]


class HandlerRegistry:
    """Maps a ``kind`` to its handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._fast_paths: dict[str, FastPath] = {}

    def register(self, kind: str, *, fast_path: FastPath | None = None) -> Callable[[Handler], Handler]:
        """Decorator: make ``handler`` the one for ``kind`` (``fast_path``: see :data:`FastPath`)."""

        def decorate(handler: Handler) -> Handler:
            if kind in self._handlers and self._handlers[kind] is not handler:
                raise ValueError(f"a handler for kind {kind!r} is already registered")
            self._handlers[kind] = handler
            if fast_path is not None:
                self._fast_paths[kind] = fast_path
            return handler

        return decorate

    def fast_path(self, kind: str | None) -> FastPath | None:
        """The one-statement fast path of ``kind``, if it has one."""
        return self._fast_paths.get(kind) if kind is not None else None

    def get(self, kind: str) -> Handler:
        """The handler of ``kind``; :class:`UnknownKindError` (permanent) when none."""
        try:
            return self._handlers[kind]
        except KeyError:
            raise UnknownKindError(f"unknown kind {kind!r}: no handler is registered for it") from None

    def kinds(self) -> list[str]:
        """Every registered kind."""
        return sorted(self._handlers)


#: The registry the worker uses.
registry = HandlerRegistry()


class ReservationPayload(BaseModel):
    """The ``reservation`` kind needs nothing but the correlation id; the payload must
    still be a JSON object (extra fields are kept for the producer's own use)."""

    model_config = ConfigDict(extra="allow")


_OUTCOMES: dict[str, Literal["burned", "reclaimed"]] = {"success": "burned", "failure": "reclaimed"}


async def settle_reservation_in_one_statement(pool: Pool, row_id: int) -> bool:
    """The common case (a pending, well-formed row whose reservation exists) in one
    round trip; anything else is left to :func:`settle_reservation`, which says why."""
    row = await pool.fetchrow(query("settle_reservation_row"), row_id)
    return row is not None and row["finished"] == 1


@registry.register("reservation", fast_path=settle_reservation_in_one_statement)
async def settle_reservation(conn: Connection, event: OutboxEvent) -> None:
    """``success`` burns the reservation (balance unchanged); ``failure`` reclaims it
    (its amount goes back to the account). A reservation already settled stays as it is."""
    if event.outcome not in _OUTCOMES:
        raise PermanentError(
            f"outcome must be 'success' or 'failure' for kind 'reservation', got {event.outcome!r}"
        )
    parse_payload(ReservationPayload, event)
    statement = "burn_reservation" if _OUTCOMES[event.outcome] == "burned" else "reclaim_reservation"
    status = await conn.execute(query(statement), event.correlation_id)
    if status.endswith(" 0"):
        state = await conn.fetchval(query("reservation_state"), event.correlation_id)
        if state is None:
            raise PermanentError(f"no reservation {event.correlation_id!r}")
        # Already burned or reclaimed: nothing changes twice.
