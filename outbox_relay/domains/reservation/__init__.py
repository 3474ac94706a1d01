"""The reference domain: two-phase currency reservations, burned on success, reclaimed on failure.

Published as the plugin ``reservation`` (entry point in ``outbox_relay.plugins``):
the handler, the one-statement fast path and the ``ledger`` schema's migrations.
"""

from __future__ import annotations

from pathlib import Path

from outbox_relay.domains.reservation.handler import FAST_PATH, KIND, settle_reservation
from outbox_relay.handlers import Plugin

plugin = Plugin(
    name="reservation",
    handlers={KIND: settle_reservation},
    fast_paths={KIND: FAST_PATH},
    migrations=Path(__file__).resolve().parent / "migrations",
)

__all__ = ["plugin", "settle_reservation"]
