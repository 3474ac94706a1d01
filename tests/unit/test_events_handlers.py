"""Events and handlers: row decoding, payload validation, the registry, the reservation handler."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from outbox_relay.domains.reservation import settle_reservation
from outbox_relay.domains.reservation.handler import query
from outbox_relay.events import OutboxEvent, parse_payload
from outbox_relay.exceptions import PermanentError, PluginError, UnknownKindError
from outbox_relay.handlers import HandlerRegistry, registry

CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def row(**overrides: Any) -> dict[str, Any]:
    """A row as claim_row returns it (jsonb payload as text, tracking columns included)."""
    values: dict[str, Any] = {
        "id": 7,
        "correlation_id": "job-7",
        "kind": "reservation",
        "outcome": "success",
        "payload": '{"note": "hi", "n": 2}',
        "created_at": CREATED,
        "status": "queued",
        "attempts": 1,
        "generation": 0,
    }
    values.update(overrides)
    return values


def event(**overrides: Any) -> OutboxEvent:
    """An OutboxEvent built through from_row."""
    return OutboxEvent.from_row(row(**overrides))


class Untouchable:
    """A connection stand-in that fails the test if the handler uses it at all."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the handler touched the connection ({name}) before validating the event")


class FakeConnection:
    """Records statements; execute answers ``status``, fetchval answers ``state``."""

    def __init__(self, status: str = "UPDATE 1", state: str | None = None) -> None:
        self.status = status
        self.state = state
        self.executed: list[tuple[str, tuple[Any, ...]]] = []
        self.fetched: list[tuple[str, tuple[Any, ...]]] = []

    async def execute(self, statement: str, *args: Any) -> str:
        self.executed.append((statement, args))
        return self.status

    async def fetchval(self, statement: str, *args: Any) -> str | None:
        self.fetched.append((statement, args))
        return self.state


# -- OutboxEvent ------------------------------------------------------------------------


def test_from_row_decodes_a_jsonb_text_payload() -> None:
    """A payload handed over as JSON text becomes the decoded object; the other columns are kept."""
    decoded = event()
    assert decoded.payload == {"note": "hi", "n": 2}
    assert decoded.id == 7
    assert decoded.correlation_id == "job-7"
    assert decoded.kind == "reservation"
    assert decoded.outcome == "success"
    assert decoded.created_at == CREATED
    assert decoded.attempts == 1


def test_from_row_accepts_an_already_decoded_payload_and_a_null_outcome() -> None:
    """A dict payload is kept as is and outcome may be NULL (the table does not constrain it)."""
    decoded = event(payload={"a": [1]}, outcome=None)
    assert decoded.payload == {"a": [1]}
    assert decoded.outcome is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"payload": "{not json"},
        {"id": "seven"},
        {"correlation_id": None},
        {"created_at": "yesterday-ish"},
    ],
)
def test_from_row_raises_permanent_error_on_a_malformed_row(overrides: dict[str, Any]) -> None:
    """A row that does not fit the event model is a PermanentError saying it is malformed."""
    with pytest.raises(PermanentError, match="malformed outbox row"):
        event(**overrides)


def test_from_row_raises_permanent_error_on_a_missing_column() -> None:
    """A row lacking a required column (kind) is a PermanentError, not a KeyError."""
    values = row()
    del values["kind"]
    with pytest.raises(PermanentError, match="kind"):
        OutboxEvent.from_row(values)


class EmailPayload(BaseModel):
    """A payload model of a hypothetical kind."""

    to: str


@pytest.mark.parametrize("payload", ["[1, 2]", '"text"', "null", "3"])
def test_parse_payload_rejects_a_non_object_payload_naming_the_kind(payload: str) -> None:
    """A payload that is not a JSON object is a PermanentError whose message names the kind."""
    with pytest.raises(PermanentError, match="'email'"):
        parse_payload(EmailPayload, event(kind="email", payload=payload))


def test_parse_payload_rejects_a_missing_field_and_accepts_a_good_payload() -> None:
    """A payload lacking a required field is permanent; a fitting one gives the model."""
    with pytest.raises(PermanentError, match="to"):
        parse_payload(EmailPayload, event(kind="email", payload="{}"))
    assert parse_payload(EmailPayload, event(kind="email", payload='{"to": "a@b"}')).to == "a@b"


# -- HandlerRegistry --------------------------------------------------------------------


async def _noop(conn: Any, event: OutboxEvent) -> None:
    return None


async def _other(conn: Any, event: OutboxEvent) -> None:
    return None


def test_unknown_kind_is_a_permanent_error_naming_the_kind() -> None:
    """get() of an unregistered kind raises UnknownKindError, a PermanentError, naming the kind."""
    local = HandlerRegistry()
    with pytest.raises(UnknownKindError) as caught:
        local.get("teleport")
    assert isinstance(caught.value, PermanentError)
    assert "teleport" in str(caught.value)


def test_register_then_get_returns_the_handler() -> None:
    """A registered handler is returned by get() and listed by kinds()."""
    local = HandlerRegistry()
    assert local.register("email")(_noop) is _noop
    assert local.get("email") is _noop
    assert local.kinds() == ["email"]


def test_registering_two_different_handlers_for_one_kind_raises() -> None:
    """A second, different handler for a kind is refused and the first one stays."""
    local = HandlerRegistry()
    local.register("email")(_noop)
    with pytest.raises(PluginError, match="email"):
        local.register("email")(_other)
    assert local.get("email") is _noop


def test_registering_the_same_handler_again_is_harmless() -> None:
    """Re-registering the very same function (a module imported twice) is not an error."""
    local = HandlerRegistry()
    local.register("email")(_noop)
    local.register("email")(_noop)
    assert local.get("email") is _noop


def test_default_registry_has_the_reservation_handler() -> None:
    """The worker's registry knows 'reservation' out of the box, served by settle_reservation."""
    assert "reservation" in registry.kinds()
    assert registry.get("reservation") is settle_reservation


# -- settle_reservation -----------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["bogus", "SUCCESS", "", None])
async def test_settle_rejects_a_bad_outcome_before_touching_the_connection(outcome: str | None) -> None:
    """An outcome other than 'success'/'failure' is a PermanentError naming it, with no statement run."""
    with pytest.raises(PermanentError) as caught:
        await settle_reservation(Untouchable(), event(outcome=outcome))  # type: ignore[arg-type]
    assert repr(outcome) in str(caught.value)
    assert "'success' or 'failure'" in str(caught.value)


@pytest.mark.parametrize("payload", ["[1, 2]", "null", '"x"'])
async def test_settle_rejects_a_non_object_payload_before_touching_the_connection(payload: str) -> None:
    """A reservation whose payload is not a JSON object is permanent, with no statement run."""
    with pytest.raises(PermanentError, match="'reservation'"):
        await settle_reservation(Untouchable(), event(payload=payload))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("outcome", "statement"), [("success", "burn_reservation"), ("failure", "reclaim_reservation")]
)
async def test_settle_runs_the_outcome_s_statement_once(outcome: str, statement: str) -> None:
    """success burns and failure reclaims, by correlation id, in one statement and nothing else."""
    conn = FakeConnection("UPDATE 1")
    await settle_reservation(conn, event(outcome=outcome))  # type: ignore[arg-type]
    assert conn.executed == [(query(statement), ("job-7",))]
    assert conn.fetched == []


async def test_settle_of_a_missing_reservation_is_permanent() -> None:
    """When nothing was updated and no reservation exists, the event fails permanently naming the id."""
    conn = FakeConnection("UPDATE 0", state=None)
    with pytest.raises(PermanentError, match="no reservation 'job-7'"):
        await settle_reservation(conn, event())  # type: ignore[arg-type]


@pytest.mark.parametrize("state", ["burned", "reclaimed"])
async def test_settle_of_an_already_settled_reservation_changes_nothing(state: str) -> None:
    """A reservation already settled is accepted quietly: no error, no second change."""
    conn = FakeConnection("UPDATE 0", state=state)
    await settle_reservation(conn, event(outcome="failure"))  # type: ignore[arg-type]
    assert len(conn.executed) == 1
    assert conn.fetched == [(query("reservation_state"), ("job-7",))]
