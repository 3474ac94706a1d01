"""Sinks without servers: ROUTES parsing, route lookup, the event JSON, subjects, Retry-After."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from outbox_relay import handlers as handlers_module
from outbox_relay.composition import plugins
from outbox_relay.config import load
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import PermanentError, SettingsError, TransientError, UnknownKindError
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.settings import load_settings
from outbox_relay.sinks import _combined, delivery_id, event_json
from outbox_relay.sinks.nats import subject_for
from outbox_relay.sinks.routes import Route
from outbox_relay.sinks.webhook import MAX_RETRY_AFTER, WebhookSettings, retry_after

EVENT = OutboxEvent(
    id=7,
    correlation_id="job-7",
    kind="ev.created",
    outcome="success",
    payload={"a": [1, "é"]},
    created_at=datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
)


def test_routes_parse_patterns_and_several_sinks() -> None:
    """A comma list of KIND_PATTERN=SINK[+SINK], blanks tolerated, order kept."""
    settings = load_settings({"routes": " ev.*=nats+webhook , audit=nats,"})
    assert settings.routes == (Route("ev.*", ("nats", "webhook")), Route("audit", ("nats",)))


@pytest.mark.parametrize(
    "value", ["nats", "ev.*=", "=nats", "a b=nats", "ev=nats+nats", "ev=Nats", "ev=nats+"]
)
def test_malformed_routes_name_the_variable(value: str) -> None:
    """Every malformed entry is a SettingsError naming OUTBOX_RELAY_ROUTES."""
    with pytest.raises(SettingsError) as caught:
        load_settings({"routes": value})
    assert caught.value.variable == "OUTBOX_RELAY_ROUTES"


def test_routes_refuse_a_pattern_twice_and_are_bounded() -> None:
    """Issue 15.6: a repeated pattern is refused naming it; at most 10,000 characters and 200 entries."""
    with pytest.raises(SettingsError, match=r"pattern 'ev\.\*' appears twice") as caught:
        load_settings({"routes": "ev.*=nats, ev.*=webhook"})
    assert caught.value.variable == "OUTBOX_RELAY_ROUTES"
    assert len(load_settings({"routes": ",".join(f"e{i}=nats" for i in range(200))}).routes) == 200
    with pytest.raises(SettingsError, match="more than 200 entries"):
        load_settings({"routes": ",".join(f"e{i}=nats" for i in range(201))})
    with pytest.raises(SettingsError, match="100,001 characters long"):
        load_settings({"routes": "e=nats," + " " * 99_994})


def test_a_kinds_route_is_matched_once_and_remembered_within_a_bound() -> None:
    """get() remembers each kind's route (a miss too) in a bounded memo, cleared when a route is added."""
    registry = HandlerRegistry()
    registry.route("ev.*", _other)
    for i in range(3 * handlers_module.ROUTED_KINDS_KEPT):
        assert registry.get(f"ev.{i}") is _other
    assert len(registry._routed) <= handlers_module.ROUTED_KINDS_KEPT
    with pytest.raises(UnknownKindError):
        registry.get("audit")
    registry.route("*", _noop)
    assert registry.get("audit") is _noop


def test_unknown_sink_names_the_variable_and_the_installed_sinks() -> None:
    """A route to a sink no plugin provides is refused at the edge."""
    settings = load_settings({"routes": "ev.*=sqs", "database_url": "postgresql://x@127.0.0.1/db"})
    with pytest.raises(
        SettingsError, match=r"unknown sink .sqs.*installed sinks: .*kafka.*nats.*webhook"
    ) as caught:
        plugins(settings, HandlerRegistry())
    assert caught.value.variable == "OUTBOX_RELAY_ROUTES"


def test_webhook_route_needs_url_and_secret() -> None:
    """Naming the webhook sink without its URL is a SettingsError naming WEBHOOK_URL."""
    settings = load_settings({"routes": "ev=webhook", "database_url": "postgresql://x@127.0.0.1/db"})
    with pytest.raises(SettingsError, match="OUTBOX_RELAY_WEBHOOK_URL"):
        plugins(settings, HandlerRegistry())


@pytest.mark.parametrize("secret", ["abc", "whsec_", "whsec_!!!!", "whsec_" + "QQ=="])
def test_bad_webhook_secrets_are_refused_without_echoing_them(secret: str) -> None:
    """The secret must be whsec_ + base64 of >= 16 bytes; the message does not contain it."""
    with pytest.raises(SettingsError) as caught:
        load(WebhookSettings, {"secret": secret})
    assert caught.value.variable == "OUTBOX_RELAY_WEBHOOK_SECRET"
    assert secret not in str(caught.value) or secret in ("whsec_",)


async def _noop(conn: object, event: OutboxEvent) -> None:
    return None


async def _other(conn: object, event: OutboxEvent) -> None:
    return None


def test_a_kinds_own_handler_wins_over_routes_and_the_first_route_wins() -> None:
    """get(): the exact handler, else the first matching route (fnmatch, case-sensitive), else unknown."""
    registry = HandlerRegistry()
    registry.register("ev.special")(_noop)
    registry.route("ev.*", _other)
    registry.route("*", _noop)
    assert registry.get("ev.special") is _noop
    assert registry.get("ev.created") is _other
    assert registry.get("audit") is _noop
    assert registry.routes() == ["ev.*", "*"]
    narrow = HandlerRegistry()
    narrow.route("ev.*", _other)
    with pytest.raises(UnknownKindError):
        narrow.get("EV.created")


def test_event_json_has_the_contract_fields_and_an_offset() -> None:
    """The delivered object: exactly the five fields, created_at ISO 8601 with its UTC offset."""
    body = json.loads(event_json(EVENT))
    assert body == {
        "correlation_id": "job-7",
        "kind": "ev.created",
        "outcome": "success",
        "payload": {"a": [1, "é"]},
        "created_at": "2026-01-02T03:04:05.600000+00:00",
    }


def test_delivery_id_carries_the_requeue_generation() -> None:
    """The correlation id, then <id>#<n> after the n-th requeue."""
    assert delivery_id(EVENT) == "job-7"
    assert delivery_id(EVENT.model_copy(update={"generation": 2})) == "job-7#2"


@pytest.mark.parametrize("kind", ["a b", "x.*", "x.>", "x..y", "", "tab\there", "nl\n"])
def test_kinds_that_cannot_be_subjects_are_permanent(kind: str) -> None:
    """Blanks, wildcards and empty tokens would publish elsewhere or break the protocol."""
    with pytest.raises(PermanentError):
        subject_for("outbox.", kind)


def test_subject_is_prefix_plus_kind() -> None:
    """outbox. + ev.created."""
    assert subject_for("outbox.", "ev.created") == "outbox.ev.created"


def test_retry_after_reads_seconds_and_dates_and_is_capped() -> None:
    """Delta-seconds and HTTP dates both count; garbage is ignored; a huge value is cut."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after("5") == 5.0
    assert retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    assert retry_after("soon") is None
    assert retry_after(None) is None
    assert retry_after("99999999") == MAX_RETRY_AFTER


def test_combined_failure_is_permanent_if_any_sink_is_and_keeps_the_longest_wait() -> None:
    """Several sinks failing: one error naming each; permanent wins; else the longest Retry-After."""
    transient = _combined(
        [("nats", TransientError("down")), ("webhook", TransientError("503", retry_after=4))]
    )
    assert isinstance(transient, TransientError)
    assert transient.retry_after == 4
    assert str(transient) == "nats: down; webhook: 503"
    permanent = _combined(
        [("nats", TransientError("down")), ("webhook", PermanentError("webhook answered 404"))]
    )
    assert isinstance(permanent, PermanentError)
    assert "404" in str(permanent)
