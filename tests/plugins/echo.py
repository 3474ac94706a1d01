"""A third-party sink plugin with settings of its own (``OUTBOX_RELAY_ECHO_*``), for the tests.

Name it in HANDLER_MODULES as ``tests.plugins.echo:plugin``; a route ``ev.*=echo`` then builds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from outbox_relay.config import HOUR, SettingsBase
from outbox_relay.diagnosis import Check
from outbox_relay.events import OutboxEvent
from outbox_relay.sinks import SinkContext, SinkPlugin


class EchoSettings(SettingsBase):
    """``OUTBOX_RELAY_ECHO_GREETING``, ``_LIMIT``, ``_TOKEN``, ``_PAUSE``: bounded like the core's."""

    model_config = SettingsConfigDict(env_prefix="OUTBOX_RELAY_ECHO_")

    greeting: str = Field(default="hello", min_length=1, max_length=40)
    limit: int = Field(default=3, ge=1, le=10)
    token: SecretStr | None = None
    pause: float = Field(default=0.0, ge=0, le=HOUR, allow_inf_nan=False)


@dataclass
class EchoSink:
    """Keeps what it was built from and every delivery it made."""

    context: SinkContext
    settings: EchoSettings
    name: str = "echo"
    delivered: list[str] = field(default_factory=list)

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Nothing to open."""
        yield

    async def diagnose(self, kinds: Sequence[str]) -> list[Check]:
        """One line naming the kinds it was asked about."""
        return [Check("echo", "ok", f"asked about {', '.join(kinds) or 'no kinds'}")]

    async def deliver(self, event: OutboxEvent, body: bytes, delivery_id: str) -> None:
        """Remember the delivery id."""
        self.delivered.append(delivery_id)


#: Every sink built, newest last (a test reads what the edge gave it).
BUILT: list[EchoSink] = []


def _make(context: SinkContext) -> EchoSink:
    sink = EchoSink(context, context.own_settings(EchoSettings))
    BUILT.append(sink)
    return sink


plugin = SinkPlugin("echo", handlers={}, settings=EchoSettings, make=_make)
