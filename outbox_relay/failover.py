"""Whether the primary's physical standbys can take the subscription's slot over (doctor's lines).

PostgreSQL 17+ keeps a copy of a *failover* logical slot on each physical
standby that runs ``sync_replication_slots = on`` (with ``hot_standby_feedback
= on``, a physical slot in ``primary_slot_name`` and a ``dbname`` in
``primary_conninfo``); the primary lists those standbys' physical slots in
``synchronized_standby_slots`` so that no logical subscriber receives a change
before they have it. On 15 and 16 a logical slot lives on the primary alone.

This module judges what the primary shows (:class:`FailoverFacts`, read by
``doctor``): a pure function, so that every version's advice is tested without
a server of that version. A standby's own view (``pg_replication_slots.synced``
there) is not reachable from the primary; the fixes say how to read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from outbox_relay.diagnosis import Check
from outbox_relay.replication import FAILOVER_SLOTS_VERSION

#: What to do after a failover, whatever the version.
REPOINT = (
    "after a failover: set OUTBOX_RELAY_PRIMARY_URL (and OUTBOX_RELAY_SUBSCRIPTION_CONNINFO) to the promoted "
    "primary and run `outbox-relay repoint`"
)
_STANDBY_SETUP = (
    "on each standby: ALTER SYSTEM SET sync_replication_slots = on; "
    "ALTER SYSTEM SET hot_standby_feedback = on; "
    "(primary_slot_name set, and dbname=… in primary_conninfo) SELECT pg_reload_conf(); then check there: "
    "SELECT slot_name, synced, temporary FROM pg_replication_slots; (synced and not temporary: ready)"
)


@dataclass(frozen=True)
class StandbySlot:
    """A physical slot on the primary: a standby streams through it when ``active``."""

    name: str
    active: bool
    #: The standby sends hot_standby_feedback (the slot holds an xmin).
    feedback: bool


@dataclass(frozen=True)
class FailoverFacts:
    """What the primary shows (one row of doctor.sql's ``failover_facts``)."""

    version_num: int
    #: The subscription (quoted for SQL) and its slot.
    subscription: str
    slot: str
    #: The slot's ``failover`` flag (None: no such slot, or a release without the flag).
    slot_failover: bool | None
    standbys: tuple[StandbySlot, ...]
    synchronized_standby_slots: tuple[str, ...]
    #: Sessions of standbys' slot sync workers (each standby with sync_replication_slots = on has one).
    slotsync_sessions: int

    @classmethod
    def from_row(cls, row: Any, subscription: str, slot: str) -> FailoverFacts:
        standbys = tuple(
            StandbySlot(str(s["name"]), bool(s["active"]), bool(s["feedback"]))
            for s in json.loads(str(row["standbys"]))
        )
        listed = tuple(
            name.strip().strip('"')
            for name in str(row["synchronized_standby_slots"]).split(",")
            if name.strip()
        )
        failover = row["slot_failover"]
        return cls(
            version_num=int(row["version_num"]),
            subscription=subscription,
            slot=slot,
            slot_failover=None if failover is None else bool(failover),
            standbys=standbys,
            synchronized_standby_slots=listed,
            slotsync_sessions=int(row["slotsync_sessions"]),
        )


def failover_checks(facts: FailoverFacts) -> list[Check]:
    """doctor's lines on the slot's survival of a failover of the primary."""
    if facts.version_num < FAILOVER_SLOTS_VERSION:
        return [_before_failover_slots(facts)]
    return [_slot_flag(facts), _standbys(facts), _slot_sync(facts), _synchronized(facts)]


def _major(version_num: int) -> int:
    return version_num // 10000


def _before_failover_slots(facts: FailoverFacts) -> Check:
    """15 and 16: no slot survives a failover; what to do after one."""
    why = (
        f"PostgreSQL {_major(facts.version_num)}: logical slots live on the primary alone (failover slots "
        f"need 17+), so a promoted standby has no slot {facts.slot}; the subscription stops at a failover"
    )
    fix = (
        f"{REPOINT}: it makes a new slot there and copies the outbox, skipping the rows this service "
        "already holds (nothing lost, nothing applied twice). Upgrade the primary to 17+ to keep the slot "
        "on its standbys"
    )
    if not facts.standbys:
        return Check("primary slot failover", "ok", why + f" (no physical standby slot here); {fix}")
    return Check("primary slot failover", "warn", why + f" ({_standby_names(facts)})", fix)


def _standby_names(facts: FailoverFacts) -> str:
    active = [s.name for s in facts.standbys if s.active]
    return (
        f"{len(active)} of {len(facts.standbys)} physical standby slots active: {', '.join(active) or 'none'}"
    )


def _slot_flag(facts: FailoverFacts) -> Check:
    if facts.slot_failover:
        return Check("primary slot failover", "ok", f"{facts.slot} is a failover slot (failover = true)")
    sub = facts.subscription
    fix = (
        "run `outbox-relay subscribe` again (it makes the slot a failover slot), or on the service database: "
        f"ALTER SUBSCRIPTION {sub} DISABLE; ALTER SUBSCRIPTION {sub} SET (failover = true); "
        f"ALTER SUBSCRIPTION {sub} ENABLE;"
    )
    found = f"{facts.slot} has failover = false: no standby keeps a copy, a failover loses the slot"
    return Check("primary slot failover", "warn" if facts.standbys else "ok", found, fix)


def _standbys(facts: FailoverFacts) -> Check:
    """The physical slots standbys stream through, and their hot_standby_feedback."""
    if not facts.standbys:
        return Check(
            "primary standbys",
            "ok",
            "no physical replication slot: no standby could take the slot over (one that should streams "
            "through a physical slot, primary_slot_name)",
        )
    idle = [s.name for s in facts.standbys if not s.active]
    blind = [s.name for s in facts.standbys if s.active and not s.feedback]
    found = _standby_names(facts)
    if blind:
        return Check(
            "primary standbys",
            "warn",
            f"{found}; no hot_standby_feedback from {', '.join(blind)}: "
            "a synced slot there can be invalidated",
            "on that standby: ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf();",
        )
    if idle:
        return Check(
            "primary standbys",
            "warn",
            f"{found}; not streaming: {', '.join(idle)}",
            "start that standby, or drop its slot if it is retired: "
            "SELECT pg_drop_replication_slot('<name>');",
        )
    return Check("primary standbys", "ok", found + ", each with hot_standby_feedback")


def _slot_sync(facts: FailoverFacts) -> Check:
    """Standbys' slot sync workers (sync_replication_slots = on) connected to the primary."""
    active = sum(1 for s in facts.standbys if s.active)
    found = f"{facts.slotsync_sessions} slot sync worker(s) connected, {active} standby(s) streaming"
    if not active:
        return Check("standby slot sync", "ok", found)
    if facts.slotsync_sessions < active:
        return Check(
            "standby slot sync",
            "warn",
            found + ": a standby without sync_replication_slots = on cannot take the slot over",
            _STANDBY_SETUP,
        )
    return Check("standby slot sync", "ok", found + f"; {REPOINT} (it adopts the synced slot)")


def _synchronized(facts: FailoverFacts) -> Check:
    """synchronized_standby_slots: set to the standbys' physical slots, each existing and streaming."""
    listed, name = facts.synchronized_standby_slots, "primary synchronized_standby_slots"
    by_name = {s.name: s for s in facts.standbys}
    wanted = ",".join(s.name for s in facts.standbys) or "<physical slot>"
    set_it = f"ALTER SYSTEM SET synchronized_standby_slots = '{wanted}'; SELECT pg_reload_conf();"
    if not listed:
        if not facts.standbys:
            return Check(name, "ok", "empty (no standby)")
        return Check(
            name,
            "warn",
            "empty: the subscriber may receive changes no standby has yet, and be ahead of a promoted one",
            set_it,
        )
    missing = [n for n in listed if n not in by_name]
    idle = [n for n in listed if n in by_name and not by_name[n].active]
    if missing or idle:
        parts = [f"no physical slot {', '.join(missing)}"] * bool(missing) + [
            f"{', '.join(idle)} not streaming"
        ] * bool(idle)
        return Check(
            name,
            "fail",
            f"{','.join(listed)}: {'; '.join(parts)}: logical replication waits for it (a stall)",
            f"start that standby, or list only streaming standbys: {set_it}",
        )
    return Check(name, "ok", ",".join(listed))
