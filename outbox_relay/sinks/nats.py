"""The `nats` sink: publish each event to NATS JetStream, finish the row on the stream's PubAck.

Subject: ``OUTBOX_RELAY_NATS_SUBJECT_PREFIX`` + the kind. Header ``Nats-Msg-Id``:
the delivery id (the correlation id, ``<id>#<n>`` after the row's n-th
requeue), so that the stream drops a second publish of the same event within
its duplicate window. Needs the extra ``outbox-relay[nats]`` (nats-py), imported
only when a route names this sink.

One client per worker process, connected on first use and reconnecting on its
own for as long as the worker runs: while the server is away every publish
times out (transient) and is retried by the worker's backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError, TransientError
from outbox_relay.logs import describe
from outbox_relay.settings import NatsConfig, Settings
from outbox_relay.sinks import SinkPlugin

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

logger = logging.getLogger(__name__)

NAME = "nats"


def subject_for(prefix: str, kind: str) -> str:
    """The subject of an event of ``kind``; a kind that cannot be one is a :class:`PermanentError`."""
    subject = prefix + kind
    tokens = subject.split(".")
    if not all(t and t.isprintable() and not any(c.isspace() or c in "*>" for c in t) for t in tokens):
        raise PermanentError(
            f"kind {kind!r} does not make a NATS subject (no blanks, wildcards or empty tokens)"
        )
    return subject


class NatsSink:
    """JetStream publisher of one worker process."""

    name = NAME

    def __init__(self, config: NatsConfig) -> None:
        import nats  # noqa: F401  (fail at the edge when the extra is missing)

        self.config = config
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Nothing to open up front (the client connects on first use); close it on exit."""
        try:
            yield
        finally:
            client, self._client, self._js = self._client, None, None
            if client is not None and not client.is_closed:
                try:
                    await asyncio.wait_for(client.close(), 5.0)
                except Exception as exc:
                    logger.debug("closing the NATS client failed", extra={"error": describe(exc)})

    async def _jetstream(self) -> JetStreamContext:
        if self._js is not None:
            return self._js
        async with self._connecting:
            if self._js is None:
                import nats

                try:
                    client = await nats.connect(
                        servers=list(self.config.servers),
                        connect_timeout=min(self.config.timeout, 5.0),
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,  # forever: the worker outlives a broker restart
                        reconnect_time_wait=0.5,
                        error_cb=_on_error,
                        disconnected_cb=_on_disconnected,
                        reconnected_cb=_on_reconnected,
                    )
                except Exception as exc:
                    raise TransientError(f"NATS server unreachable: {describe(exc)}") from None
                self._client = client
                self._js = client.jetstream(timeout=self.config.timeout)
            assert self._js is not None
            return self._js

    async def deliver(self, event: OutboxEvent, body: bytes, delivery_id: str) -> None:
        """Publish and wait for the stream's PubAck."""
        from nats.errors import Error as NatsError
        from nats.js.errors import APIError, NoStreamResponseError

        subject = subject_for(self.config.subject_prefix, event.kind)
        js = await self._jetstream()
        try:
            ack = await js.publish(
                subject, body, timeout=self.config.timeout, headers={"Nats-Msg-Id": delivery_id}
            )
        except NoStreamResponseError:
            raise PermanentError(f"no JetStream stream for subject {subject!r}") from None
        except APIError as exc:  # the stream answered with an error (storage full, limits)
            raise TransientError(f"JetStream refused the publish to {subject!r}: {describe(exc)}") from None
        except (NatsError, TimeoutError, OSError) as exc:
            raise TransientError(f"NATS publish to {subject!r} not acknowledged: {describe(exc)}") from None
        if ack.duplicate:
            logger.debug(
                "JetStream dropped a duplicate",
                extra={"row_id": event.id, "stream": ack.stream, "seq": ack.seq},
            )


async def _on_error(exc: Exception) -> None:
    logger.debug("NATS client error", extra={"error": describe(exc)})


async def _on_disconnected() -> None:
    logger.warning("NATS server disconnected; reconnecting")


async def _on_reconnected() -> None:
    logger.info("NATS server reconnected")


def _make(settings: Settings) -> NatsSink:
    return NatsSink(settings.nats_config())


plugin = SinkPlugin(NAME, handlers={}, make=_make)
