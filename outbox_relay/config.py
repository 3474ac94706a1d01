"""The rules every settings class follows, the core's and each plugin's.

A settings class derives from :class:`SettingsBase` with a prefix of its own
(the core ``OUTBOX_RELAY_``, a plugin e.g. ``OUTBOX_RELAY_NATS_``); values are
bounded on both sides, URLs are :class:`~pydantic.SecretStr`, and
:func:`load` reads the environment once, turning the first bad value into a
:class:`~outbox_relay.exceptions.SettingsError` naming its variable (exit 2,
one line). An empty value of a setting that may be unset means unset. Nothing
here knows any particular setting.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SettingsSourceError

from outbox_relay.exceptions import SettingsError

#: The prefix every variable of this project starts with (a plugin's adds its own word).
ENV_PREFIX = "OUTBOX_RELAY_"
HOUR = 3600.0
DAY = 86_400.0

PG_SCHEMES = ("postgresql", "postgres")
HTTP_SCHEMES = ("http", "https")

S = TypeVar("S", bound="SettingsBase")


class SettingsBase(BaseSettings):
    """A settings class read from ``<env_prefix><FIELD>`` variables, frozen once read."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        """``VAR=`` (empty) on a setting that may be unset (``X | None``) means unset: what a user
        writing ``OUTBOX_RELAY_PRIMARY_URL=`` in an env file means, not an invalid URL."""
        if value == "" and info.field_name is not None and _optional(cls.model_fields[info.field_name]):
            return None
        return value

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable of ``field``."""
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def _optional(field: FieldInfo) -> bool:
    """True when ``field`` may be None (its type is ``X | None``)."""
    return type(None) in get_args(field.annotation)


def load(cls: type[S], overrides: Mapping[str, Any] | None = None) -> S:
    """Read ``cls`` from the environment (plus ``overrides``) once.

    Raises :class:`SettingsError` naming the first bad variable.
    """
    try:
        return cls(**dict(overrides or {}))
    except SettingsSourceError as exc:  # a value the environment source could not even parse
        match = re.search(r'field "([a-z_]+)"', str(exc))
        prefix = str(cls.model_config.get("env_prefix", ""))
        raise SettingsError(cls.env_name(match[1]) if match else prefix + "*", "cannot be parsed") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        message = error["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        raise SettingsError(cls.env_name(field), message) from None


def seconds(default: float | None, *, le: float, description: str, ge: float | None = None) -> Any:
    """A field of seconds: finite, above 0 (or at least ``ge``) and at most ``le``."""
    return Field(
        default=default,
        gt=0 if ge is None else None,
        ge=ge,
        le=le,
        allow_inf_nan=False,
        description=description,
    )


def count(default: int, *, le: int, description: str) -> Any:
    """A field counting something: from 1 to ``le``."""
    return Field(default=default, ge=1, le=le, description=description)


def url_of(schemes: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> AfterValidator:
    """For ``Annotated[SecretStr, url_of(...)]``: the value must be a URL of ``schemes`` (see
    :func:`check_url`); a callable is asked at each validation (e.g. the installed queue backends)."""

    def validate(value: SecretStr) -> SecretStr:
        check_url(value.get_secret_value(), schemes() if callable(schemes) else schemes)
        return value

    return AfterValidator(validate)


def check_url(url: str, schemes: tuple[str, ...]) -> None:
    """A ``ValueError`` unless ``url`` parses, has one of ``schemes`` and only valid ports."""
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
