"""Settings: built once at the edge (the CLI) from ``OUTBOX_RELAY_*`` variables, then passed down.

Every URL is a :class:`~pydantic.SecretStr` so that it never reaches a log or an
error message by accident; :func:`outbox_relay.config.redact_url` gives a printable form.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from outbox_relay.config import DAY, HOUR, PG_SCHEMES, SettingsBase, count, load, seconds, url_of
from outbox_relay.exceptions import SettingsError
from outbox_relay.queue.backends import check as check_queue_url
from outbox_relay.queue.backends import schemes as queue_schemes
from outbox_relay.sinks.routes import Route, parse_routes

_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: Upper bound of RETENTION and of `prune --older-than`: ten years (365-day years).
MAX_RETENTION = 3650 * DAY
#: Upper bound of MAX_ATTEMPTS: far below int4, and the retry delay's doubling stays a finite float.
MAX_ATTEMPTS_LIMIT = 100
#: A PostgreSQL URL (a secret: it may hold a password).
PostgresUrl = Annotated[SecretStr, url_of(PG_SCHEMES)]


def _queue_url_form(value: SecretStr) -> SecretStr:
    """The queue URL as its backend takes it (e.g. a Sentinel URL's service), not only its scheme."""
    check_queue_url(value.get_secret_value())
    return value


#: The queue's URL (a secret): a scheme an installed backend serves, in a form that backend takes.
QueueUrl = Annotated[SecretStr, url_of(queue_schemes), AfterValidator(_queue_url_form)]


class Settings(SettingsBase):
    """Every setting of outbox_relay; the environment variable is ``OUTBOX_RELAY_<NAME>``."""

    # -- the contract's settings ---------------------------------------------
    database_url: PostgresUrl | None = Field(
        default=None, description="service database (required, except for `demo`)"
    )
    primary_url: PostgresUrl | None = Field(
        default=None, description="primary, for `migrate --primary`, `subscribe` and `unsubscribe`"
    )
    redis_url: QueueUrl = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="arq's Redis: redis://, rediss://, unix://, or a Sentinel set (redis+sentinel://, "
        "rediss+sentinel://)",
    )
    queue_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="arq queue (default: derived from the service database's identity, see "
        "identity.resolve_queue)",
    )
    sweep_interval: float = seconds(5.0, le=HOUR, description="period of the sweep (seconds)")
    requeue_after: float = seconds(
        60.0, le=DAY, description="a `queued` row older than this (seconds) is enqueued again by the sweep"
    )
    max_attempts: int = count(
        5, le=MAX_ATTEMPTS_LIMIT, description="attempts before a transient failure turns the row `failed`"
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
    job_timeout: float = seconds(
        10.0,
        le=HOUR,
        description="time one handler attempt may take (seconds); a killed worker's job "
        "is run again by another worker after job_timeout + 6 s",
    )
    retry_backoff: float = seconds(
        1.0, le=DAY, description="first delay before a transient retry (seconds), doubling"
    )
    retry_backoff_max: float = seconds(60.0, le=DAY, description="cap of the transient retry delay (seconds)")
    worker_concurrency: int = count(32, le=1000, description="jobs one worker process runs at once")
    worker_poll_delay: float = seconds(
        0.01,
        le=60.0,
        description="how often a busy worker polls Redis for its next job (seconds); an idle "
        "one blocks on the relay's wake-up instead",
    )
    batch_size: int = count(500, le=10_000, description="rows the relay enqueues per round trip")
    hand_over_interval: float = seconds(
        0.005,
        ge=0,
        le=1.0,
        description="least time between two hand-overs of notified rows (seconds): under a steady "
        "stream, rows arriving meanwhile join the next batch; a row after a quiet spell goes at once",
    )
    job_batch_size: int = count(
        50,
        le=1000,
        description="rows one queue job carries at most (a hand-over of fewer rows makes smaller "
        "jobs: one row at low load)",
    )
    worker_idle_wait: float = seconds(
        1.0,
        ge=0.01,
        le=4.0,
        description="longest time an idle worker blocks on the relay's wake-up before it looks "
        "at the queue again (seconds)",
    )
    sink_in_flight: int = count(
        64,
        le=10_000,
        description="deliveries one worker keeps in flight per sink at most (their acknowledgements "
        "awaited together)",
    )
    max_queue_depth: int = count(
        20_000,
        le=10_000_000,
        description="the relay stops enqueueing while the arq queue holds this many jobs "
        "(each of up to JOB_BATCH_SIZE rows)",
    )
    retention: float | None = seconds(
        None,
        le=MAX_RETENTION,
        description="`prune` removes finished rows finished more than this many seconds ago "
        "(default: keep forever)",
    )
    prune_interval: float = seconds(
        300.0, le=DAY, description="period of the relay's prune when RETENTION is set (seconds)"
    )
    prune_batch_size: int = count(5000, le=100_000, description="rows `prune` deletes per short transaction")
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

    # -- routing (contract section 7): each sink's own settings live in its plugin -----------
    routes: Annotated[tuple[Route, ...], NoDecode] = Field(
        default=(),
        description="comma list of KIND_PATTERN=SINK or KIND_PATTERN=SINK+SINK (shell wildcards, "
        "first match wins) for kinds without a handler of their own",
    )

    @field_validator("routes", mode="before")
    @classmethod
    def _parse_routes(cls, value: Any) -> Any:
        return parse_routes(value) if isinstance(value, str) else value

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


def env_name(field: str) -> str:
    """The environment variable of a core settings field."""
    return Settings.env_name(field)


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read the core's settings from the environment (plus command-line ``overrides``) once.

    Raises :class:`SettingsError` naming the first bad variable.
    """
    return load(Settings, overrides)
