"""The ``reservation`` kind: ``success`` burns the reservation, ``failure`` reclaims it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from outbox_relay.db import Connection
from outbox_relay.events import OutboxEvent, parse_payload
from outbox_relay.exceptions import PermanentError
from outbox_relay.handlers import FastPath
from outbox_relay.sql import QueryFile

KIND = "reservation"

query = QueryFile(Path(__file__).resolve().parent / "queries.sql")

#: The common case (a pending, well-formed row whose reservation exists), composed
#: by the worker with the core's claim and finish into one statement.
FAST_PATH = FastPath(ctes=query("fast_path_ctes"), applied=query("fast_path_applied"))

_OUTCOMES: dict[str, Literal["burned", "reclaimed"]] = {"success": "burned", "failure": "reclaimed"}


class ReservationPayload(BaseModel):
    """The ``reservation`` kind needs nothing but the correlation id; the payload must
    still be a JSON object (extra fields are kept for the producer's own use)."""

    model_config = ConfigDict(extra="allow")


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
