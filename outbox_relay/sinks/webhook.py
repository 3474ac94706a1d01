"""The `webhook` sink: POST each event to one URL, signed per Standard Webhooks.

Headers: ``webhook-id`` (the delivery id: the correlation id, ``<id>#<n>`` after
the row's n-th requeue), ``webhook-timestamp`` (unix seconds) and
``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``
with the ``whsec_`` secret, by the ``standardwebhooks`` reference package).
2xx finishes the row; 408, 429, 5xx, timeouts and connection errors are
transient (a ``Retry-After`` sets the least delay before the retry); any other
status is permanent, its code in ``last_error``. Redirects are not followed.
Needs the extra ``outbox-relay[webhook]`` (aiohttp, standardwebhooks).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from outbox_relay.config import HOUR, HTTP_SCHEMES, SettingsBase, seconds, url_of
from outbox_relay.diagnosis import Check
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError, SettingsError, TransientError
from outbox_relay.logs import describe
from outbox_relay.sinks import SinkContext, SinkPlugin
from outbox_relay.terminal import escape_controls

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

NAME = "webhook"
#: The longest Retry-After honoured (seconds): a longer one is cut to this.
MAX_RETRY_AFTER = HOUR
TRANSIENT_STATUSES = frozenset({408, 429})
#: Bytes of an answer's body read at most (the body says nothing the status does not).
MAX_RESPONSE_BODY = 64 * 1024
#: Longest response header line or field accepted (bytes), and the most of a Location kept.
MAX_HEADER_LINE = 16 * 1024
MAX_LOCATION = 500
#: Seconds `doctor` waits for the endpoint's host to accept a connection.
DIAGNOSE_CONNECT = 3.0


class WebhookSettings(SettingsBase):
    """The `webhook` sink's settings: ``OUTBOX_RELAY_WEBHOOK_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="OUTBOX_RELAY_WEBHOOK_")

    url: Annotated[SecretStr, url_of(HTTP_SCHEMES)] | None = Field(
        default=None, description="the endpoint, http(s)://"
    )
    secret: SecretStr | None = Field(
        default=None, description="Standard Webhooks signing secret, whsec_ + base64"
    )
    timeout: float = seconds(5.0, le=HOUR, description="one webhook request (seconds)")

    @field_validator("secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret = value.get_secret_value()
            try:
                key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if not secret.startswith("whsec_") or len(key) < 16:
                raise ValueError("must be whsec_ followed by base64 of at least 16 bytes")
        return value


@dataclass(frozen=True)
class WebhookConfig:
    """What the sink needs (URL and secret left out of ``repr``)."""

    url: str = field(repr=False)
    secret: str = field(repr=False)
    timeout: float
    connections: int

    @classmethod
    def from_context(cls, context: SinkContext) -> WebhookConfig:
        """The sink's config; its URL and secret are required once a route names it."""
        settings = context.own_settings(WebhookSettings)
        if settings.timeout > context.job_timeout:
            raise SettingsError(
                settings.env_name("timeout"),
                f"must not exceed OUTBOX_RELAY_JOB_TIMEOUT ({context.job_timeout:g} s): a request "
                "cut by the job's deadline may already have been accepted",
            )
        if settings.url is None:
            raise SettingsError(settings.env_name("url"), "is required when a route names the webhook sink")
        if settings.secret is None:
            raise SettingsError(
                settings.env_name("secret"), "is required when a route names the webhook sink"
            )
        return cls(
            url=settings.url.get_secret_value(),
            secret=settings.secret.get_secret_value(),
            timeout=settings.timeout,
            connections=context.in_flight,
        )


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from now, capped; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    seconds: float
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class WebhookSink:
    """One pooled HTTP client per worker process."""

    name = NAME

    def __init__(self, config: WebhookConfig) -> None:
        import aiohttp  # noqa: F401  (fail at the edge when the extra is missing)
        from standardwebhooks import Webhook

        self.config = config
        self._signer = Webhook(config.secret)
        self._session: aiohttp.ClientSession | None = None

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open the connection pool; close it on exit."""
        import aiohttp

        session = aiohttp.ClientSession(  # keep-alive connections, one pool per worker process
            connector=aiohttp.TCPConnector(limit=self.config.connections, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
        )
        self._session = session
        try:
            yield
        finally:
            self._session = None
            await session.close()

    async def diagnose(self, kinds: Sequence[str]) -> list[Check]:
        """The endpoint's host accepts connections (only a TCP connection: `doctor` sends nothing)."""
        parts = urlsplit(self.config.url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        where = f"{parts.scheme}://{host}:{port}"  # never the path, query or credentials
        try:
            async with asyncio.timeout(DIAGNOSE_CONNECT):
                _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            return [
                Check(
                    "webhook",
                    "fail",
                    f"{where} does not accept connections: {describe(exc)}",
                    "check OUTBOX_RELAY_WEBHOOK_URL and that the receiver is up (rows wait and retry)",
                )
            ]
        return [Check("webhook", "ok", f"{where} accepts connections")]

    def headers(self, body: bytes, delivery_id: str, now: datetime) -> dict[str, str]:
        """The request's headers, the Standard Webhooks ones signed over ``body``."""
        return {
            "content-type": "application/json",
            "webhook-id": delivery_id,
            "webhook-timestamp": str(math.floor(now.timestamp())),
            "webhook-signature": self._signer.sign(delivery_id, now, body.decode()),
        }

    async def deliver(self, event: OutboxEvent, body: bytes, delivery_id: str) -> None:
        """POST the event; return on 2xx, raise by the status rules otherwise."""
        import aiohttp

        if self._session is None:
            raise TransientError("the webhook sink is not open (worker starting or stopping)")
        headers = self.headers(body, delivery_id, datetime.now(UTC))
        try:
            async with self._session.post(
                self.config.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                wait = retry_after(response.headers.get("Retry-After"))
                location = response.headers.get("Location")
                await _drain(response)  # read (a bounded part of) the body
        except TimeoutError:
            raise TransientError(f"webhook timed out after {self.config.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"webhook unreachable: {describe(exc)}") from None
        _judge(status, wait, location)


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read at most MAX_RESPONSE_BODY bytes of the answer: a small body returns the connection to
    the pool; a larger one is not read whole (the connection is closed instead)."""
    read = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        read += len(chunk)
        if read > MAX_RESPONSE_BODY:
            response.close()
            return


def _judge(status: int, wait: float | None, location: str | None) -> None:
    """2xx returns; 408, 429 and 5xx are transient (Retry-After honoured); a redirect is permanent
    naming where it points (the sink reaches only the address the operator set); others permanent."""
    if 200 <= status < 300:
        return
    if status in TRANSIENT_STATUSES or status >= 500:
        suffix = f" (Retry-After {wait:g} s)" if wait is not None else ""
        raise TransientError(f"webhook answered {status}{suffix}", retry_after=wait)
    if 300 <= status < 400:
        where = escape_controls(location[:MAX_LOCATION]) if location else "no Location"
        raise PermanentError(f"webhook answered {status} redirecting to {where} (redirects are not followed)")
    raise PermanentError(f"webhook answered {status}")


def _make(context: SinkContext) -> WebhookSink:
    return WebhookSink(WebhookConfig.from_context(context))


plugin = SinkPlugin(NAME, handlers={}, settings=WebhookSettings, make=_make)
