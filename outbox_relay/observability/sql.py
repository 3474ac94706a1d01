"""The named queries of ``observability/queries.sql`` (same ``-- name:`` format as the core's)."""

from __future__ import annotations

from pathlib import Path

from outbox_relay.sql import QueryFile

query = QueryFile(Path(__file__).resolve().parent / "queries.sql")
