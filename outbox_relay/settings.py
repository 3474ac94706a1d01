"""Settings: built once at the edge (the CLI) from ``OUTBOX_RELAY_*`` variables, then passed down.

Every URL is a :class:`~pydantic.SecretStr` so that it never reaches a log or an
error message by accident; :func:`redact_url` gives a printable form.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SettingsSourceError

from outbox_relay.exceptions import SettingsError

ENV_PREFIX = "OUTBOX_RELAY_"

_PG_SCHEMES = ("postgresql", "postgres")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_HTTP_SCHEMES = ("http", "https")
#: A sink's name in ROUTES, and a kind pattern: no separators, no blanks.
_SINK_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_PATTERN_RE = re.compile(r"^[^\s,=+]+$")
#: NATS subject characters: no blanks and no wildcards in a subject one publishes to.
_SUBJECT_PREFIX_RE = re.compile(r"^[^\s*>]*$")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

HOUR = 3600.0
DAY = 86_400.0
#: Upper bound of RETENTION and of `prune --older-than`: ten years (365-day years).
MAX_RETENTION = 3650 * DAY
#: Upper bound of MAX_ATTEMPTS: far below int4, and the retry delay's doubling stays a finite float.
MAX_ATTEMPTS_LIMIT = 100


@dataclass(frozen=True)
class Route:
    """One entry of ROUTES: the kinds matching ``pattern`` go to each of ``sinks``."""

    pattern: str
    sinks: tuple[str, ...]


def parse_routes(text: str) -> tuple[Route, ...]:
    """``"ev.*=nats+webhook, audit=nats"`` as routes; a malformed entry is a ``ValueError``."""
    routes = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        pattern, equals, names = (part.strip() for part in entry.partition("="))
        sinks = tuple(name.strip() for name in names.split("+"))
        if not (equals and _PATTERN_RE.match(pattern) and all(_SINK_RE.match(s) for s in sinks)):
            raise ValueError(f"entry {entry!r} is not KIND_PATTERN=SINK or KIND_PATTERN=SINK+SINK")
        if len(set(sinks)) != len(sinks):
            raise ValueError(f"entry {entry!r} names a sink twice")
        routes.append(Route(pattern, sinks))
    return tuple(routes)


class Settings(BaseSettings):
    """Every setting of outbox_relay; the environment variable is ``OUTBOX_RELAY_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    # -- the contract's settings ---------------------------------------------
    database_url: SecretStr | None = Field(
        default=None, description="service database (required, except for `demo`)"
    )
    primary_url: SecretStr | None = Field(
        default=None, description="primary, for `migrate --primary`, `subscribe` and `unsubscribe`"
    )
    redis_url: SecretStr = Field(default=SecretStr("redis://127.0.0.1:6379/0"), description="arq's Redis")
    queue_name: str = Field(default="outbox_relay", min_length=1, max_length=200, description="arq queue")
    sweep_interval: float = Field(
        default=5.0, gt=0, le=HOUR, allow_inf_nan=False, description="period of the sweep (seconds)"
    )
    requeue_after: float = Field(
        default=60.0,
        gt=0,
        le=DAY,
        allow_inf_nan=False,
        description="a `queued` row older than this (seconds) is enqueued again by the sweep",
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        le=MAX_ATTEMPTS_LIMIT,
        description="attempts before a transient failure turns the row `failed`",
    )
    subscription_conninfo: SecretStr | None = Field(
        default=None,
        description="connection string the service database's server uses to reach the primary "
        "(default: PRIMARY_URL; set it where the two see the primary under different names)",
    )
    subscription_name: str | None = Field(
        default=None,
        description="subscription and replication slot name (default: derived by `subscribe` from the "
        "service database's identity, see replication.subscription_name)",
    )

    # -- extensions ------------------------------------------------------------
    job_timeout: float = Field(
        default=10.0,
        gt=0,
        le=HOUR,
        allow_inf_nan=False,
        description="time one handler attempt may take (seconds); a killed worker's job "
        "is run again by another worker after job_timeout + 15 s",
    )
    retry_backoff: float = Field(
        default=1.0,
        gt=0,
        le=DAY,
        allow_inf_nan=False,
        description="first delay before a transient retry (seconds), doubling",
    )
    retry_backoff_max: float = Field(
        default=60.0,
        gt=0,
        le=DAY,
        allow_inf_nan=False,
        description="cap of the transient retry delay (seconds)",
    )
    worker_concurrency: int = Field(
        default=32, ge=1, le=1000, description="jobs one worker process runs at once"
    )
    worker_poll_delay: float = Field(
        default=0.01,
        gt=0,
        le=60.0,
        allow_inf_nan=False,
        description="how often a busy worker polls Redis for its next job (seconds); an idle "
        "one blocks on the relay's wake-up instead",
    )
    batch_size: int = Field(
        default=500, ge=1, le=10_000, description="rows the relay enqueues per round trip"
    )
    hand_over_interval: float = Field(
        default=0.005,
        ge=0,
        le=1.0,
        allow_inf_nan=False,
        description="least time between two hand-overs of notified rows (seconds): under a steady "
        "stream, rows arriving meanwhile join the next batch; a row after a quiet spell goes at once",
    )
    job_batch_size: int = Field(
        default=50,
        ge=1,
        le=1000,
        description="rows one queue job carries at most (a hand-over of fewer rows makes smaller "
        "jobs: one row at low load)",
    )
    worker_idle_wait: float = Field(
        default=1.0,
        ge=0.01,
        le=4.0,
        allow_inf_nan=False,
        description="longest time an idle worker blocks on the relay's wake-up before it looks "
        "at the queue again (seconds)",
    )
    max_queue_depth: int = Field(
        default=20_000,
        ge=1,
        le=10_000_000,
        description="the relay stops enqueueing while the arq queue holds this many jobs "
        "(each of up to JOB_BATCH_SIZE rows)",
    )
    retention: float | None = Field(
        default=None,
        gt=0,
        le=MAX_RETENTION,
        allow_inf_nan=False,
        description="`prune` removes finished rows finished more than this many seconds ago "
        "(default: keep forever)",
    )
    prune_interval: float = Field(
        default=300.0,
        gt=0,
        le=DAY,
        allow_inf_nan=False,
        description="period of the relay's prune when RETENTION is set (seconds)",
    )
    prune_batch_size: int = Field(
        default=5000, ge=1, le=100_000, description="rows `prune` deletes per short transaction"
    )
    # NoDecode: the variable is a comma list, not the JSON pydantic-settings expects for tuples.
    handler_modules: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="comma-separated modules imported by `worker` to register handlers"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO")
    log_format: Literal["text", "json"] = Field(default="text")
    http_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="`run` and `worker` serve /healthz, /readyz and /metrics on this port (default: none)",
    )
    http_host: str = Field(
        default="127.0.0.1", min_length=1, max_length=255, description="address the HTTP server binds"
    )

    # -- sinks (contract section 7) ---------------------------------------------
    routes: Annotated[tuple[Route, ...], NoDecode] = Field(
        default=(),
        description="comma list of KIND_PATTERN=SINK or KIND_PATTERN=SINK+SINK (shell wildcards, "
        "first match wins) for kinds without a handler of their own",
    )
    nats_url: SecretStr = Field(default=SecretStr("nats://127.0.0.1:4222"), description="the `nats` sink")
    nats_subject_prefix: str = Field(
        default="outbox.", max_length=200, description="subject of an event: this prefix + its kind"
    )
    nats_timeout: float = Field(
        default=5.0, gt=0, le=HOUR, allow_inf_nan=False, description="wait for a JetStream PubAck (seconds)"
    )
    webhook_url: SecretStr | None = Field(default=None, description="the `webhook` sink's endpoint")
    webhook_secret: SecretStr | None = Field(
        default=None, description="Standard Webhooks signing secret, whsec_ + base64"
    )
    webhook_timeout: float = Field(
        default=5.0, gt=0, le=HOUR, allow_inf_nan=False, description="one webhook request (seconds)"
    )

    @field_validator("database_url", "primary_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_url(value.get_secret_value(), _PG_SCHEMES)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        _check_url(value.get_secret_value(), _REDIS_SCHEMES)
        return value

    @field_validator("routes", mode="before")
    @classmethod
    def _parse_routes(cls, value: Any) -> Any:
        return parse_routes(value) if isinstance(value, str) else value

    @field_validator("nats_url")
    @classmethod
    def _nats_url(cls, value: SecretStr) -> SecretStr:
        for url in value.get_secret_value().split(","):  # nats-py takes several servers
            _check_url(url.strip(), _NATS_SCHEMES)
        return value

    @field_validator("nats_subject_prefix")
    @classmethod
    def _subject_prefix(cls, value: str) -> str:
        if not _SUBJECT_PREFIX_RE.match(value) or ".." in value or value.startswith("."):
            raise ValueError("must be subject tokens (no blanks, no * or >, no empty token), e.g. 'outbox.'")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_url(value.get_secret_value(), _HTTP_SCHEMES)
        return value

    @field_validator("webhook_secret")
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

    @field_validator("subscription_name")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.match(value):
            raise ValueError("must be a lower-case PostgreSQL identifier: letters, digits, _; at most 63")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("handler_modules", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    # -- derived -----------------------------------------------------------------

    def require_database_url(self) -> str:
        """The service database URL, or a :class:`SettingsError` naming the variable."""
        if self.database_url is None:
            raise SettingsError(env_name("database_url"), "is required")
        return self.database_url.get_secret_value()

    def require_primary_url(self) -> str:
        """The primary URL, or a :class:`SettingsError` naming the variable."""
        if self.primary_url is None:
            raise SettingsError(env_name("primary_url"), "is required for this command")
        return self.primary_url.get_secret_value()

    @property
    def job_namespace(self) -> str:
        """Prefix of every job id: arq job ids share one namespace per Redis database."""
        return f"outbox_relay:{self.queue_name}"

    # -- narrow objects for the core, built here at the edge ---------------------------

    def relay_config(self) -> RelayConfig:
        """What the relay (`run`) needs."""
        return RelayConfig(
            database_url=self.require_database_url(),
            queue_name=self.queue_name,
            sweep_interval=self.sweep_interval,
            requeue_after=self.requeue_after,
            batch_size=self.batch_size,
            max_queue_depth=self.max_queue_depth,
            hand_over_interval=self.hand_over_interval,
        )

    def worker_config(self) -> WorkerConfig:
        """What the worker's row processor needs."""
        return WorkerConfig(
            database_url=self.require_database_url(),
            concurrency=self.worker_concurrency,
            job_timeout=self.job_timeout,
            max_attempts=self.max_attempts,
            retry_backoff=self.retry_backoff,
            retry_backoff_max=self.retry_backoff_max,
        )

    def nats_config(self) -> NatsConfig:
        """What the `nats` sink needs."""
        return NatsConfig(
            servers=tuple(u.strip() for u in self.nats_url.get_secret_value().split(",")),
            subject_prefix=self.nats_subject_prefix,
            timeout=self.nats_timeout,
        )

    def webhook_config(self) -> WebhookConfig:
        """What the `webhook` sink needs; its URL and secret are then required."""
        if self.webhook_url is None:
            raise SettingsError(env_name("webhook_url"), "is required when a route names the webhook sink")
        if self.webhook_secret is None:
            raise SettingsError(env_name("webhook_secret"), "is required when a route names the webhook sink")
        return WebhookConfig(
            url=self.webhook_url.get_secret_value(),
            secret=self.webhook_secret.get_secret_value(),
            timeout=self.webhook_timeout,
            connections=self.worker_concurrency,
        )

    def retention_config(self) -> RetentionConfig | None:
        """The relay's periodic prune, when RETENTION is set."""
        if self.retention is None:
            return None
        return RetentionConfig(self.retention, self.prune_interval, self.prune_batch_size)


@dataclass(frozen=True)
class RelayConfig:
    """The relay's settings (the URL is a secret: left out of ``repr``)."""

    database_url: str = field(repr=False)
    queue_name: str
    sweep_interval: float
    requeue_after: float
    batch_size: int
    max_queue_depth: int
    hand_over_interval: float = 0.0


@dataclass(frozen=True)
class WorkerConfig:
    """The worker's settings (the URL is a secret: left out of ``repr``)."""

    database_url: str = field(repr=False)
    concurrency: int
    job_timeout: float
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float


@dataclass(frozen=True)
class RetentionConfig:
    """How long finished rows stay, how often the relay prunes, rows per step."""

    retention: float
    interval: float
    batch_size: int


@dataclass(frozen=True)
class NatsConfig:
    """The `nats` sink's settings (server URLs may hold credentials: left out of ``repr``)."""

    servers: tuple[str, ...] = field(repr=False)
    subject_prefix: str
    timeout: float


@dataclass(frozen=True)
class WebhookConfig:
    """The `webhook` sink's settings (URL and secret left out of ``repr``)."""

    url: str = field(repr=False)
    secret: str = field(repr=False)
    timeout: float
    connections: int


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read the environment (plus command-line ``overrides``) once.

    Raises :class:`SettingsError` naming the first bad variable.
    """
    try:
        return Settings(**dict(overrides or {}))
    except SettingsSourceError as exc:  # a value the environment source could not even parse
        match = re.search(r'field "([a-z_]+)"', str(exc))
        raise SettingsError(env_name(match[1]) if match else ENV_PREFIX + "*", "cannot be parsed") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        message = error["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        raise SettingsError(env_name(field), message) from None


def _check_url(url: str, schemes: tuple[str, ...]) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in schemes:
        raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
    # libpq takes several hosts, "h1:5432,h2:5433": check every port.
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(","):
        after_ipv6 = host.rpartition("]")[2]  # "[::1]:5432" -> ":5432"
        _, colon, port = after_ipv6.rpartition(":")
        if colon and port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError("has a port that is not a number from 1 to 65535")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
