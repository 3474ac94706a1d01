"""The servers the bench runs on, their CPU, and the machine it runs on."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil

from bench.fleet import tree_cpu
from outbox_relay.devtools.embedded import (
    DURABLE_PG_SETTINGS,
    FSYNC_OFF_PG_SETTINGS,
    EmbeddedPostgres,
    EmbeddedRedis,
)
from outbox_relay.settings import Settings


class Servers:
    """The servers the bench runs on: embedded (default) or given by the settings."""

    def __init__(self, settings: Settings | None, workdir: Path, *, fsync_off: bool = False) -> None:
        self.pg: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        if settings is None:
            durability = FSYNC_OFF_PG_SETTINGS if fsync_off else DURABLE_PG_SETTINGS
            (workdir / "pg").mkdir()
            self.pg = EmbeddedPostgres(workdir / "pg", settings={"max_wal_size": "4GB", **durability})
            self.pg.start()
            (workdir / "redis").mkdir()
            self.redis = EmbeddedRedis(workdir / "redis")
            self.redis.start()
            self.admin_url = self.pg.url("postgres")
            self.redis_url = self.redis.url()
        else:
            self.admin_url = _with_database(settings.require_database_url(), "postgres")
            self.redis_url = settings.redis_url.get_secret_value()

    def url(self, database: str) -> str:
        """The URL of ``database`` on this server."""
        return _with_database(self.admin_url, database)

    def cpu_seconds(self) -> dict[str, float | None]:
        """Total CPU so far of PostgreSQL (postmaster, its live and reaped children) and Redis."""
        out: dict[str, float | None] = {"postgresql": None, "redis": None}
        if self.pg is not None and (pid := self.pg.pid()) is not None:
            out["postgresql"] = tree_cpu(pid, include_reaped=True)
        if self.redis is not None and (rpid := self.redis.pid()) is not None:
            out["redis"] = tree_cpu(rpid, include_reaped=False)
        return out

    def durability(self) -> dict[str, str | None]:
        """The embedded cluster's durability settings (empty on given servers)."""
        if self.pg is None:
            return {}
        return {key: self.pg.settings.get(key) for key in ("fsync", "synchronous_commit", "full_page_writes")}

    def cleanup(self) -> None:
        """Stop the embedded servers and remove their files."""
        if self.redis is not None:
            self.redis.cleanup()
        if self.pg is not None:
            self.pg.cleanup()


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def machine() -> dict[str, Any]:
    """CPUs, memory, Python and platform of this machine."""
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
