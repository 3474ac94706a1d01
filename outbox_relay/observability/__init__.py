"""Health, metrics and their HTTP endpoints (``OUTBOX_RELAY_HTTP_PORT``): contract section 6.

* :mod:`.health` — loops beat a heartbeat with a deadline (``/healthz``); the
  owner sets readiness with its reasons and role (``/readyz``);
* :mod:`.metrics` — prometheus-client metrics on a dedicated registry;
* :mod:`.http` — the aiohttp server exposing both;
* :mod:`.refresh` — the active relay's periodic, index-only database gauges.
"""

from outbox_relay.observability.health import Health
from outbox_relay.observability.metrics import Metrics

__all__ = ["Health", "Metrics"]
