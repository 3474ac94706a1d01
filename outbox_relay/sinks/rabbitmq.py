"""The `rabbitmq` sink: publish each event to a RabbitMQ exchange, finish the row on the broker's confirm.

Exchange: ``OUTBOX_RELAY_RABBITMQ_EXCHANGE`` (declared by the operator, never by
the relay); routing key: the kind. Each message is persistent
(``delivery_mode`` 2), ``content_type`` ``application/json``, its
``message_id`` the delivery id (the correlation id, ``<id>#<n>`` after the
row's n-th requeue: RabbitMQ has no deduplication of its own, consumers
deduplicate on it), ``type`` the kind, ``timestamp`` the event's
``created_at``, and headers ``kind``, ``outcome`` and ``correlation_id`` (for
headers exchanges and consumers). Needs the extra ``outbox-relay[rabbitmq]``
(aio-pika), imported only when a route names this sink.

Publishes go out on one channel with publisher confirms, ``mandatory`` and
``on_return_raises``: a message no queue is bound for comes back (``NO_ROUTE``)
and fails for good, as does an exchange that does not exist (the broker closes
the channel with 404; the next delivery opens a fresh one). Many deliveries are
in flight at once on that channel, each awaiting its own confirm.

One connection per worker process, opened on first use and again on the first
delivery after it was lost: while the broker is away every delivery fails fast
(transient) and is retried by the worker's backoff; nothing is buffered and
published behind the worker's back after an outage.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from outbox_relay.config import HOUR, SettingsBase, seconds, url_of
from outbox_relay.diagnosis import Check
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError, TransientError
from outbox_relay.logs import describe
from outbox_relay.sinks import SinkContext, SinkPlugin

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

logger = logging.getLogger(__name__)

NAME = "rabbitmq"
AMQP_SCHEMES = ("amqp", "amqps")
#: An AMQP short string (exchange name, routing key, message_id, type): at most this many bytes.
SHORT_STRING = 255
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: RabbitMQ's refusal of a message over its max_message_size: "message size N is larger than …".
_TOO_LARGE_RE = re.compile(r"message size (\d+) is larger than")
_DECLARE_HINT = (
    "declare it (e.g. `rabbitmqadmin declare exchange name={name} type=topic durable=true`) "
    "and bind the consumers' queues to it"
)


class RabbitmqSettings(SettingsBase):
    """The `rabbitmq` sink's settings: ``OUTBOX_RELAY_RABBITMQ_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="OUTBOX_RELAY_RABBITMQ_")

    url: Annotated[SecretStr, url_of(AMQP_SCHEMES)] = Field(
        default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        description="the broker, amqp(s)://user:password@host:port/vhost (query options as aio-pika's)",
    )
    exchange: str = Field(
        default="outbox",
        min_length=1,
        max_length=SHORT_STRING,
        description="the exchange events are published to (routing key: the kind); never declared",
    )
    timeout: float = seconds(5.0, le=HOUR, description="wait for the broker's confirm of a publish (seconds)")
    connect_timeout: float = seconds(2.0, le=60.0, description="one attempt to connect (seconds)")

    @field_validator("exchange")
    @classmethod
    def _exchange(cls, value: str) -> str:
        if len(value.encode()) > SHORT_STRING or _CONTROL_RE.search(value):
            raise ValueError(f"must be an exchange name: at most {SHORT_STRING} bytes, no control characters")
        return value


@dataclass(frozen=True)
class RabbitmqConfig:
    """What the sink needs (the URL holds the password: left out of ``repr``)."""

    url: str = field(repr=False)
    exchange: str
    timeout: float
    connect_timeout: float

    @classmethod
    def from_settings(cls, settings: RabbitmqSettings) -> RabbitmqConfig:
        """The sink's config from its settings."""
        return cls(
            url=settings.url.get_secret_value(),
            exchange=settings.exchange,
            timeout=settings.timeout,
            connect_timeout=settings.connect_timeout,
        )

    @property
    def address(self) -> str:
        """``host:port/vhost`` of the broker, without credentials (for messages)."""
        parts = urlsplit(self.url)
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        vhost = unquote(parts.path[1:])
        return f"{parts.hostname or 'localhost'}:{port}" + (f" (vhost {vhost!r})" if vhost else "")

    def scrub(self, text: str) -> str:
        """``text`` without the URL's password, whatever the library put in it."""
        password = urlsplit(self.url).password
        return text.replace(password, "***") if password else text


def routing_key_for(kind: str) -> str:
    """The routing key of an event of ``kind``; one over AMQP's 255 bytes is a :class:`PermanentError`."""
    if len(kind.encode()) > SHORT_STRING:
        raise PermanentError(
            f"kind {kind[:60]!r}… is {len(kind.encode())} bytes: too long for a RabbitMQ routing key "
            f"(at most {SHORT_STRING})"
        )
    return kind


class RabbitmqSink:
    """Publisher of one worker process: one connection, one confirming channel."""

    name = NAME

    def __init__(self, config: RabbitmqConfig) -> None:
        import aio_pika  # noqa: F401  (fail at the edge when the extra is missing)

        self.config = config
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._opening = asyncio.Lock()
        self._attempts = 0  # connection attempts made
        self._last_error: TransientError | None = None  # how the last one failed

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Nothing to open up front (connected on first use); close the connection on exit."""
        try:
            yield
        finally:
            self._channel = self._exchange = None
            await self._drop_connection()

    def _why(self, exc: BaseException) -> str:
        return self.config.scrub(describe(exc))

    async def _connect(self) -> AbstractConnection:
        """A new connection: one bounded attempt; a failure is transient."""
        import aio_pika
        from aiormq.exceptions import AuthenticationError, ProbableAuthenticationError

        try:
            return await aio_pika.connect(
                self.config.url,
                timeout=self.config.connect_timeout,
                client_properties={"connection_name": "outbox_relay"},
            )
        except (AuthenticationError, ProbableAuthenticationError) as exc:
            raise TransientError(
                f"RabbitMQ at {self.config.address} refused the login: {self._why(exc)}"
            ) from None
        except Exception as exc:
            raise TransientError(f"RabbitMQ at {self.config.address} unreachable: {self._why(exc)}") from None

    async def _open_exchange(self) -> AbstractExchange:
        """The exchange on a live confirming channel, reconnecting or reopening what was lost."""
        exchange, channel = self._exchange, self._channel
        if exchange is not None and channel is not None and not channel.is_closed:
            return exchange
        attempts = self._attempts
        async with self._opening:
            if self._connection is None or not _alive(self._connection):
                if self._attempts != attempts and self._last_error is not None:
                    # an attempt made while this delivery waited failed: share it (a broker away
                    # costs each delivery one wait at most, not one per delivery queued before it)
                    raise TransientError(str(self._last_error))
                self._channel = self._exchange = None
                await self._drop_connection()
                self._attempts += 1
                try:
                    self._connection = await self._connect()
                except TransientError as exc:
                    self._last_error = exc
                    raise
                self._last_error = None
                self._connection.close_callbacks.add(self._on_connection_closed)
                logger.info("connected to RabbitMQ", extra={"broker": self.config.address})
            if self._channel is None or self._channel.is_closed or self._exchange is None:
                try:
                    channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                    exchange = await channel.get_exchange(self.config.exchange, ensure=False)
                except Exception as exc:
                    raise TransientError(f"RabbitMQ channel not opened: {self._why(exc)}") from None
                self._channel, self._exchange = channel, exchange
            assert self._exchange is not None
            return self._exchange

    async def _drop_connection(self) -> None:
        """Close what is left of a lost connection (its transport gone)."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), 5.0)
            except Exception as exc:
                logger.debug("closing the RabbitMQ connection failed", extra={"error": self._why(exc)})

    def _on_connection_closed(self, _: object, exc: BaseException | None) -> None:
        if exc is not None:
            logger.warning(
                "RabbitMQ connection lost; the next delivery reconnects", extra={"error": self._why(exc)}
            )

    async def deliver(self, event: OutboxEvent, body: bytes, delivery_id: str) -> None:
        """Publish (persistent, mandatory) and wait for the broker's confirm."""
        import aio_pika

        key = routing_key_for(event.kind)
        if len(delivery_id.encode()) > SHORT_STRING:
            raise PermanentError(
                f"delivery id is {len(delivery_id.encode())} bytes: too long for an AMQP message_id "
                f"(at most {SHORT_STRING})"
            )
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=delivery_id,
            type=key,
            timestamp=event.created_at,
            app_id="outbox_relay",
            headers={"kind": event.kind, "outcome": event.outcome, "correlation_id": event.correlation_id},
        )
        exchange = await self._open_exchange()
        try:
            await exchange.publish(message, routing_key=key, mandatory=True, timeout=self.config.timeout)
        except Exception as exc:
            raise self._failure(exc, key, len(body)) from None

    def _failure(self, exc: Exception, key: str, size: int) -> PermanentError | TransientError:
        """What a failed publish means for the row (see the module's docstring)."""
        from aiormq.exceptions import (
            ChannelAccessRefused,
            ChannelNotFoundEntity,
            ChannelPreconditionFailed,
            DeliveryError,
            PublishError,
        )

        where = f"exchange {self.config.exchange!r}, routing key {key!r}"
        if isinstance(exc, PublishError):  # returned: no queue bound for the key (or none took it)
            reply = getattr(exc.frame, "reply_text", "returned")
            return PermanentError(
                f"RabbitMQ could not route the message ({reply}): no queue bound for {where}"
            )
        if isinstance(exc, DeliveryError):
            return TransientError(f"RabbitMQ refused the message (nack) on {where}")
        if isinstance(exc, ChannelNotFoundEntity):
            return PermanentError(f"RabbitMQ has no exchange {self.config.exchange!r} (routing key {key!r})")
        if isinstance(exc, ChannelAccessRefused):
            return PermanentError(f"RabbitMQ refused access to {where}: {self._why(exc)}")
        if isinstance(exc, ChannelPreconditionFailed) and _too_large(exc, size):
            return PermanentError(f"RabbitMQ refused the message on {where}: {self._why(exc)}")
        if isinstance(exc, TimeoutError):
            return TransientError(f"RabbitMQ did not confirm within {self.config.timeout:g} s on {where}")
        # the connection or channel lost (another row's refusal closes the channel for all in flight)
        return TransientError(f"RabbitMQ publish on {where} not confirmed: {self._why(exc)}")

    async def diagnose(self, kinds: Sequence[str]) -> list[Check]:
        """For `doctor`: the broker answers (its version), the exchange exists, each kind is a valid
        routing key. Read-only: a passive declare on a channel of its own, nothing published."""
        try:
            connection = await self._connect()
        except TransientError as exc:
            fix = "start RabbitMQ, or set OUTBOX_RELAY_RABBITMQ_URL (host, port, user and password)"
            return [Check(NAME, "fail", str(exc), fix=fix)]
        try:
            checks = [Check(NAME, "ok", f"{_server(connection)} answers at {self.config.address}")]
            checks.append(await self._check_exchange(connection))
        finally:
            try:
                await asyncio.wait_for(connection.close(), 5.0)
            except Exception as exc:
                logger.debug("closing the RabbitMQ connection failed", extra={"error": self._why(exc)})
        too_long = [k for k in kinds if len(k.encode()) > SHORT_STRING]
        if too_long:
            more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
            checks.append(
                Check(
                    f"{NAME} routing keys",
                    "fail",
                    f"kind {too_long[0][:60]!r}… is over {SHORT_STRING} bytes{more}",
                    fix="shorten the kind: its rows fail permanently",
                )
            )
        return checks

    async def _check_exchange(self, connection: AbstractConnection) -> Check:
        from aiormq.exceptions import ChannelNotFoundEntity

        name = self.config.exchange
        try:
            channel = await asyncio.wait_for(connection.channel(), self.config.timeout)
            await asyncio.wait_for(channel.declare_exchange(name, passive=True), self.config.timeout)
        except ChannelNotFoundEntity:
            return Check(
                f"{NAME} exchange",
                "fail",
                f"exchange {name!r} does not exist",
                fix=_DECLARE_HINT.format(name=name),
            )
        except Exception as exc:
            return Check(f"{NAME} exchange", "fail", f"exchange {name!r} not checked: {self._why(exc)}")
        await asyncio.wait_for(channel.close(), self.config.timeout)
        return Check(
            f"{NAME} exchange",
            "ok",
            f"exchange {name!r} exists (bound queues not checked over AMQP: an unbound kind fails its rows)",
        )


def _alive(connection: AbstractConnection) -> bool:
    """True while ``connection`` has its transport (aio-pika marks a plain connection closed only when
    closed by us; a lost one merely stops being ``connected``)."""
    return not connection.is_closed and connection.connected.is_set()


def _too_large(exc: Exception, size: int) -> bool:
    """True when ``exc`` is the broker refusing this very message for its size (406 names the size)."""
    match = _TOO_LARGE_RE.search(str(exc))
    return match is not None and int(match[1]) == size


def _server(connection: AbstractConnection) -> str:
    """``RabbitMQ 3.10.8``, from the properties the server sent on connect."""
    underlay = connection.transport.connection if connection.transport is not None else None
    properties: dict[str, Any] = dict(getattr(underlay, "server_properties", None) or {})
    product, version = properties.get("product", "AMQP server"), properties.get("version", "")
    return f"{product} {version}".strip()


def _make(context: SinkContext) -> RabbitmqSink:
    return RabbitmqSink(RabbitmqConfig.from_settings(context.own_settings(RabbitmqSettings)))


plugin = SinkPlugin(NAME, handlers={}, settings=RabbitmqSettings, make=_make)
