"""doctor's judgement of whether the primary's standbys can take the slot over (outbox_relay/failover.py),
for every PostgreSQL release, from what the primary shows (the 17+ lines are also read from a real
PostgreSQL 18 primary and standby in tests/integration/test_primary_failover.py)."""

from __future__ import annotations

import json

import pytest

from outbox_relay.diagnosis import Check
from outbox_relay.failover import FailoverFacts, StandbySlot, failover_checks

STREAMING = StandbySlot("standby1", active=True, feedback=True)


def _facts(version: int = 180000, **changes: object) -> FailoverFacts:
    values: dict[str, object] = {
        "version_num": version,
        "subscription": '"sub_x"',
        "slot": "sub_x",
        "slot_failover": True if version >= 170000 else None,
        "standbys": (STREAMING,),
        "synchronized_standby_slots": ("standby1",) if version >= 170000 else (),
        "slotsync_sessions": 1 if version >= 170000 else 0,
    }
    values.update(changes)
    return FailoverFacts(**values)  # type: ignore[arg-type]


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@pytest.mark.parametrize("version", [150008, 160004])
def test_15_and_16_say_why_no_slot_survives_and_what_to_do_after_a_failover(version: int) -> None:
    """15/16 with a standby: one warning that the slot lives on the primary alone, the fix `repoint`."""
    [line] = failover_checks(_facts(version))
    assert line.name == "primary slot failover"
    assert line.status == "warn"
    assert f"PostgreSQL {version // 10000}" in line.detail
    assert "live on the primary alone" in line.detail
    assert "17+" in line.detail
    assert line.fix is not None
    assert "outbox-relay repoint" in line.fix
    assert "skipping the rows this service already holds" in line.fix


def test_16_without_a_standby_is_ok_and_still_says_what_to_do() -> None:
    """No physical standby slot: nothing to fail over to, ok; the advice stays in the detail."""
    [line] = failover_checks(_facts(160004, standbys=()))
    assert line.status == "ok"
    assert "outbox-relay repoint" in line.detail


def test_17_ready_is_ok_on_every_line() -> None:
    """A failover slot, a streaming standby with feedback and slot sync, listed in
    synchronized_standby_slots: four ok lines."""
    lines = failover_checks(_facts(170002))
    assert [c.name for c in lines] == [
        "primary slot failover",
        "primary standbys",
        "standby slot sync",
        "primary synchronized_standby_slots",
    ]
    assert {c.status for c in lines} == {"ok"}


def test_a_slot_without_failover_names_the_subscription_in_its_fix() -> None:
    """failover = false with a standby: warn, fix by `subscribe` or the subscription's ALTERs."""
    line = _by_name(failover_checks(_facts(slot_failover=False)))["primary slot failover"]
    assert line.status == "warn"
    assert line.fix is not None
    assert 'ALTER SUBSCRIPTION "sub_x" SET (failover = true)' in line.fix


def test_standby_settings_are_judged_from_the_primary() -> None:
    """No hot_standby_feedback (no xmin on its slot), no slot sync worker: each warns with its fix."""
    blind = StandbySlot("standby1", active=True, feedback=False)
    lines = _by_name(failover_checks(_facts(standbys=(blind,), slotsync_sessions=0)))
    assert lines["primary standbys"].status == "warn"
    assert "hot_standby_feedback = on" in str(lines["primary standbys"].fix)
    assert lines["standby slot sync"].status == "warn"
    assert "sync_replication_slots = on" in str(lines["standby slot sync"].fix)
    assert "synced" in str(lines["standby slot sync"].fix)


def test_synchronized_standby_slots_empty_warns_and_names_the_slots_to_list() -> None:
    """Unset with a standby: the subscriber may get ahead of it; the fix lists the physical slots."""
    line = _by_name(failover_checks(_facts(synchronized_standby_slots=())))[
        "primary synchronized_standby_slots"
    ]
    assert line.status == "warn"
    assert "synchronized_standby_slots = 'standby1'" in str(line.fix)


@pytest.mark.parametrize(
    ("listed", "standbys"),
    [(("gone",), (STREAMING,)), (("standby1",), (StandbySlot("standby1", active=False, feedback=False),))],
    ids=["missing-slot", "standby-down"],
)
def test_a_listed_slot_missing_or_idle_fails_as_a_stall(
    listed: tuple[str, ...], standbys: tuple[StandbySlot, ...]
) -> None:
    """A synchronized_standby_slots entry that is no streaming physical slot stalls logical replication."""
    line = _by_name(failover_checks(_facts(synchronized_standby_slots=listed, standbys=standbys)))[
        "primary synchronized_standby_slots"
    ]
    assert line.status == "fail"
    assert "stall" in line.detail


def test_facts_parse_the_query_row() -> None:
    """The doctor.sql row: standbys as JSON, the setting as a comma list (quotes and spaces dropped)."""
    row = {
        "version_num": 180001,
        "synchronized_standby_slots": ' standby1, "standby2"',
        "slot_failover": True,
        "slotsync_sessions": 2,
        "standbys": json.dumps([{"name": "standby1", "active": True, "feedback": True}]),
    }
    facts = FailoverFacts.from_row(row, '"s"', "s")
    assert facts.synchronized_standby_slots == ("standby1", "standby2")
    assert facts.standbys == (STREAMING,)
    assert facts.slot_failover is True
