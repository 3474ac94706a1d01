"""The event a handler receives: one outbox row, validated by pydantic."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from outbox_relay.db import Record
from outbox_relay.exceptions import PermanentError

M = TypeVar("M", bound=BaseModel)


class OutboxEvent(BaseModel):
    """An outbox row as handlers see it (tracking columns left out)."""

    model_config = ConfigDict(frozen=True)

    id: int
    correlation_id: str
    kind: str
    outcome: str | None
    payload: Any
    created_at: datetime
    attempts: int = 0
    #: How many times `requeue` has given the row another chance (part of its delivery id).
    generation: int = 0

    @field_validator("payload", mode="before")
    @classmethod
    def _decode_json(cls, value: Any) -> Any:
        # asyncpg hands jsonb over as text.
        return json.loads(value) if isinstance(value, str) else value

    @classmethod
    def from_row(cls, row: Record | Mapping[str, Any]) -> OutboxEvent:
        """Build from a database row; a row that does not fit is a :class:`PermanentError`."""
        try:
            return cls.model_validate(dict(row.items()))
        except (ValidationError, ValueError) as exc:
            raise PermanentError(f"malformed outbox row: {_short(exc)}") from None


def parse_payload(model: type[M], event: OutboxEvent) -> M:
    """Validate the event's payload as ``model``; a mismatch is a :class:`PermanentError`."""
    try:
        return model.model_validate(event.payload)
    except ValidationError as exc:
        raise PermanentError(f"malformed payload for kind {event.kind!r}: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors()[:3]:
            where = ".".join(str(p) for p in error["loc"]) or "value"
            parts.append(f"{where}: {error['msg']}")
        return "; ".join(parts)
    return str(exc)
