"""The relay (`run`): leadership, the dispatcher and its store, composed by :class:`Relay`."""

from __future__ import annotations

from outbox_relay.relay.dispatcher import RelayStats
from outbox_relay.relay.service import ActiveTask, Relay, RelayConfig

__all__ = ["ActiveTask", "Relay", "RelayConfig", "RelayStats"]
