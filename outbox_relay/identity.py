"""The service database's identity, and the queue its relay and workers share.

A service database is told apart everywhere by its cluster's system identifier
(random, fixed at initdb) and its oid in that cluster. The default subscription
name and the default queue name derive from it (the name for people, a hash
for uniqueness), and every job carries it, so that a worker can refuse the
job of another database. The queue name is known only once connected:
:func:`resolve_queue` is the one place it is made (``run``, ``worker``,
``doctor``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from outbox_relay.db import Connection
from outbox_relay.sql import query

#: Characters of the database's own name kept in a derived name (the rest is the hash).
_PREFIX_CHARS = 36


@dataclass(frozen=True)
class DatabaseIdentity:
    """What makes a database unique: its cluster's system identifier and its oid (plus its name,
    for people)."""

    system_identifier: str
    database_oid: int
    database: str

    @property
    def token(self) -> str:
        """What a job carries and a worker compares: ``<system identifier>/<oid>`` (no secret)."""
        return f"{self.system_identifier}/{self.database_oid}"

    def describe(self) -> str:
        """``name (system identifier/oid)``, for messages."""
        return f"{self.database} ({self.token})"


async def read_identity(conn: Connection) -> DatabaseIdentity:
    """The identity of the database ``conn`` is connected to."""
    row = await conn.fetchrow(query("database_identity"))
    assert row is not None  # current_database() is always in pg_database
    return DatabaseIdentity(row["system_identifier"], int(row["database_oid"]), row["database"])


def derived_name(database: str, system_identifier: str, database_oid: int) -> str:
    """``outbox_relay_<sanitised name>_<12 hex>``: the name is for people, the hash of the
    cluster's system identifier and the database's oid makes it unique to this database
    whatever its name, server or cluster. At most 62 characters, a valid lower-case identifier."""
    prefix = re.sub(r"[^a-z0-9_]", "_", database.lower())[:_PREFIX_CHARS]
    digest = hashlib.sha256(f"{system_identifier}/{database_oid}".encode()).hexdigest()[:12]
    return f"outbox_relay_{prefix}_{digest}"


@dataclass(frozen=True)
class ServiceQueue:
    """The queue of one service database: its name (QUEUE_NAME, else derived) and the database."""

    name: str
    database: DatabaseIdentity
    #: True when the name was derived (QUEUE_NAME not set).
    derived: bool

    @property
    def namespace(self) -> str:
        """Prefix of every job id: job ids share one namespace per queue server database."""
        return job_namespace(self.name)


def job_namespace(queue_name: str) -> str:
    """The job-id namespace of the queue ``queue_name``."""
    return f"outbox_relay:{queue_name}"


async def resolve_queue(conn: Connection, configured: str | None) -> ServiceQueue:
    """The queue of the service database ``conn`` is connected to: ``configured`` (QUEUE_NAME;
    None: not set) or the name derived from the database's identity."""
    identity = await read_identity(conn)
    if configured:
        return ServiceQueue(configured, identity, derived=False)
    name = derived_name(identity.database, identity.system_identifier, identity.database_oid)
    return ServiceQueue(name, identity, derived=True)
