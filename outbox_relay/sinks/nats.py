"""The `nats` sink: publish each event to NATS JetStream, finish the row on the stream's PubAck.

Subject: ``OUTBOX_RELAY_NATS_SUBJECT_PREFIX`` + the kind. Header ``Nats-Msg-Id``:
the delivery id (the correlation id, ``<id>#<n>`` after the row's n-th
requeue), so that the stream drops a second publish of the same event within
its duplicate window. Needs the extra ``outbox-relay[nats]`` (nats-py), imported
only when a route names this sink.

One client per worker process, connected on first use and again on the first
delivery after it lost its server: while the server is away every delivery
fails fast (transient) and is retried by the worker's backoff.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from outbox_relay.config import HOUR, SettingsBase, check_url, seconds
from outbox_relay.diagnosis import Check
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError, TransientError
from outbox_relay.logs import describe
from outbox_relay.sinks import SinkContext, SinkPlugin

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

logger = logging.getLogger(__name__)

NAME = "nats"
_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
#: NATS subject characters: no blanks and no wildcards in a subject one publishes to.
_SUBJECT_PREFIX_RE = re.compile(r"^[^\s*>]*$")


class NatsSettings(SettingsBase):
    """The `nats` sink's settings: ``OUTBOX_RELAY_NATS_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="OUTBOX_RELAY_NATS_")

    url: SecretStr = Field(
        default=SecretStr("nats://127.0.0.1:4222"), description="the server(s), comma-separated"
    )
    subject_prefix: str = Field(
        default="outbox.", max_length=200, description="subject of an event: this prefix + its kind"
    )
    timeout: float = seconds(5.0, le=HOUR, description="wait for a JetStream PubAck (seconds)")

    @field_validator("url")
    @classmethod
    def _nats_url(cls, value: SecretStr) -> SecretStr:
        for url in value.get_secret_value().split(","):  # nats-py takes several servers
            check_url(url.strip(), _NATS_SCHEMES)
        return value

    @field_validator("subject_prefix")
    @classmethod
    def _subject_prefix(cls, value: str) -> str:
        if not _SUBJECT_PREFIX_RE.match(value) or ".." in value or value.startswith("."):
            raise ValueError("must be subject tokens (no blanks, no * or >, no empty token), e.g. 'outbox.'")
        return value


@dataclass(frozen=True)
class NatsConfig:
    """What the sink needs (server URLs may hold credentials: left out of ``repr``)."""

    servers: tuple[str, ...] = field(repr=False)
    subject_prefix: str
    timeout: float

    @classmethod
    def from_settings(cls, settings: NatsSettings) -> NatsConfig:
        """The sink's config from its settings."""
        return cls(
            servers=tuple(u.strip() for u in settings.url.get_secret_value().split(",")),
            subject_prefix=settings.subject_prefix,
            timeout=settings.timeout,
        )


#: Longest subject published (bytes): far below the server's control-line limit (4 KiB by default),
#: whose breach would close the connection every delivery of this worker shares.
MAX_SUBJECT_BYTES = 1024
#: Bytes of the headers block besides the delivery id ("NATS/1.0", "Nats-Msg-Id: ", line ends).
HEADER_OVERHEAD = 64


def subject_for(prefix: str, kind: str) -> str:
    """The subject of an event of ``kind``; a kind that cannot be one is a :class:`PermanentError`."""
    subject = prefix + kind
    if len(subject.encode()) > MAX_SUBJECT_BYTES:
        raise PermanentError(
            f"kind of {len(kind)} characters makes a NATS subject over {MAX_SUBJECT_BYTES} bytes"
        )
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

    async def diagnose(self, kinds: Sequence[str]) -> list[Check]:
        """The server answers (its own client, not the deliveries'), and a JetStream stream takes
        the subject of each of ``kinds`` (or, with none seen yet, some subject under the prefix)."""
        import nats

        try:
            client = await nats.connect(
                servers=list(self.config.servers),
                connect_timeout=2.0,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                error_cb=_on_error,
            )
        except Exception as exc:
            fix = "check OUTBOX_RELAY_NATS_URL and that nats-server (with JetStream) is up"
            return [Check("nats", "fail", f"NATS server unreachable: {describe(exc)}", fix)]
        try:
            lines = [Check("nats", "ok", f"NATS server {client.connected_server_version} answers")]
            lines.append(await self._streams(client.jetstream(timeout=self.config.timeout), kinds))
            return lines
        finally:
            await client.close()

    async def _streams(self, js: JetStreamContext, kinds: Sequence[str]) -> Check:
        from nats.js.errors import NotFoundError

        subjects = [subject_for(self.config.subject_prefix, k) for k in kinds] or [
            self.config.subject_prefix + ">"
        ]
        missing = []
        for subject in subjects:
            try:
                await js.find_stream_name_by_subject(subject)
            except NotFoundError:
                missing.append(subject)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            return Check(
                "nats streams",
                "fail",
                f"no JetStream stream takes {shown}: those rows fail",
                f"nats stream add --subjects '{self.config.subject_prefix}>' (or one per subject)",
            )
        return Check("nats streams", "ok", f"a stream takes each of {len(subjects)} subject(s)")

    async def _jetstream(self) -> JetStreamContext:
        client, js = self._client, self._js
        if client is not None and js is not None and not client.is_closed:
            return js
        async with self._connecting:
            if self._client is None or self._client.is_closed or self._js is None:
                import nats

                try:
                    # One attempt per call, bounded: while the server is away each delivery fails
                    # fast (transient) and the worker's backoff paces the next try. The client
                    # does not reconnect by itself: a lost connection closes it, and the next
                    # delivery connects afresh (so no publish is buffered across an outage).
                    client = await nats.connect(
                        servers=list(self.config.servers),
                        connect_timeout=min(self.config.timeout, 2.0),
                        allow_reconnect=False,
                        # nats-py tries each server until it has failed more than this (0 would
                        # mean forever): two quick tries, then NoServersError.
                        max_reconnect_attempts=1,
                        reconnect_time_wait=0.1,
                        error_cb=_on_error,
                        disconnected_cb=_on_disconnected,
                    )
                except Exception as exc:
                    raise TransientError(f"NATS server unreachable: {describe(exc)}") from None
                self._client = client
                self._js = client.jetstream(timeout=self.config.timeout)
                logger.info("connected to NATS")
            assert self._js is not None
            return self._js

    async def deliver(self, event: OutboxEvent, body: bytes, delivery_id: str) -> None:
        """Publish and wait for the stream's PubAck."""
        from nats.errors import Error as NatsError
        from nats.js.errors import APIError, NoStreamResponseError

        subject = subject_for(self.config.subject_prefix, event.kind)
        js = await self._jetstream()
        limit = self._client.max_payload if self._client is not None else 0
        if limit and len(body) + len(delivery_id) + HEADER_OVERHEAD > limit:
            raise PermanentError(
                f"event of {len(body)} bytes is over the NATS server's max_payload ({limit} bytes)"
            )
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
    logger.warning("NATS server disconnected; the next delivery reconnects")


def _make(context: SinkContext) -> NatsSink:
    return NatsSink(NatsConfig.from_settings(context.own_settings(NatsSettings)))


plugin = SinkPlugin(NAME, handlers={}, settings=NatsSettings, make=_make)
