"""What `doctor` learns of the queue's Redis, read without changing anything.

How "one live worker" is told: arq workers refresh a health-check key per
queue (``<queue>:health-check``, TTL 61 s, refreshed every 60 s by each
worker's loop), the signal that a worker is *consuming this queue*. With it
each worker announces its service database in ``outbox_relay:workers:<queue>``
(score: until when; see consumer.py), and every job names its database: `doctor`
compares both with its own.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field

from arq.connections import ArqRedis
from arq.constants import health_check_key_suffix, job_key_prefix
from redis.exceptions import RedisError

from outbox_relay.arq_adapter.connection import is_sentinel, parse_sentinel_url
from outbox_relay.arq_adapter.producer import redis_client, workers_key
from outbox_relay.arq_adapter.sentinel import read_sentinels, sentinel_check
from outbox_relay.diagnosis import Check
from outbox_relay.logs import describe
from outbox_relay.queue import Diagnosis

SERVER = "Redis"


@dataclass(frozen=True)
class _Facts:
    version: str | None
    policy: str | None
    depth: int
    health: str | None
    ttl: float | None
    #: Redis's clock minus this host's (s), read by TIME at the middle of its round trip.
    clock_offset: float
    job_databases: dict[str, int] = field(default_factory=dict)
    worker_databases: tuple[str, ...] = ()


class ArqDiagnostics:
    """The queue's Redis at ``redis_url`` (a secret: never shown) for the queue ``queue_name``:
    reachable, its version and eviction policy, the jobs waiting, the workers' health-check key."""

    def __init__(self, redis_url: str, queue_name: str) -> None:
        self._url = redis_url
        self.queue_name = queue_name
        self.health_key = queue_name + health_check_key_suffix

    def __repr__(self) -> str:
        return f"ArqDiagnostics(queue_name={self.queue_name!r})"

    async def diagnose(self) -> Diagnosis:
        """The ``redis`` and ``redis maxmemory-policy`` lines and what the health-check key shows;
        for a Sentinel set first the ``redis sentinel`` line (sentinels, master, replicas)."""
        first: tuple[Check, ...] = ()
        if is_sentinel(self._url):
            target = parse_sentinel_url(self._url)
            found = sentinel_check(target, await read_sentinels(target))
            first = (found,)
            if found.status == "fail":
                return self._unreachable("no master found through the sentinels", first)
        redis = redis_client(self._url, queue_name=self.queue_name, max_connections=2)
        try:
            facts = await self._read(redis)
        except (RedisError, OSError, TimeoutError) as exc:
            return self._unreachable(describe(exc), first)
        finally:
            await redis.aclose(close_connection_pool=True)
        return Diagnosis(
            checks=first + self._checks(facts),
            reachable=True,
            workers_seen=self._seen(facts),
            workers_signal=self.health_key,
            server=SERVER,
            clock_offset=facts.clock_offset,
            job_databases=facts.job_databases,
            worker_databases=facts.worker_databases,
        )

    async def _read(self, redis: ArqRedis) -> _Facts:
        # INFO memory works where a managed Redis disables CONFIG.
        server = await redis.info("server")
        memory = await redis.info("memory")
        depth = int(await redis.zcard(self.queue_name))
        health, ttl = await redis.get(self.health_key), None
        if health is not None:
            ttl_ms = int(await redis.pttl(self.health_key))
            ttl = ttl_ms / 1000 if ttl_ms >= 0 else None
        before = time.time()
        seconds, microseconds = await redis.time()
        offset = seconds + microseconds / 1e6 - (before + time.time()) / 2
        return _Facts(
            server.get("redis_version"),
            memory.get("maxmemory_policy"),
            depth,
            None if health is None else health.decode(errors="replace"),
            ttl,
            offset,
            await self._job_databases(redis),
            await self._worker_databases(redis),
        )

    async def _job_databases(self, redis: ArqRedis, sample: int = 100) -> dict[str, int]:
        """The databases named by the first ``sample`` jobs of the queue (jobs naming none: skipped)."""
        ids = await redis.zrange(self.queue_name, 0, sample - 1)
        payloads = await redis.mget([job_key_prefix + raw.decode() for raw in ids]) if ids else []
        found: Counter[str] = Counter()
        for payload in payloads:
            if payload is None or payload[:1] != b"{":
                continue  # gone meanwhile, or a pickled job (0.1.0's, arq's own): no identity
            with contextlib.suppress(ValueError, AttributeError):
                database = json.loads(payload).get("k", {}).get("database")
                if isinstance(database, str) and database:
                    found[database] += 1
        return dict(found)

    async def _worker_databases(self, redis: ArqRedis) -> tuple[str, ...]:
        """The databases the live workers of this queue said they serve."""
        seconds, micros = await redis.time()  # the clock the workers' entries were written by
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        members = await redis.zrangebyscore(workers_key(self.queue_name), f"({now_ms}", "+inf")
        return tuple(sorted(m.decode(errors="replace") for m in members))

    def _unreachable(self, error: str, first: tuple[Check, ...] = ()) -> Diagnosis:
        fix = "check OUTBOX_RELAY_REDIS_URL and that Redis is up"
        return Diagnosis(
            checks=(*first, Check("redis", "fail", f"cannot reach Redis: {error}", fix)),
            reachable=False,
            workers_seen=None,
            workers_signal=self.health_key,
            server=SERVER,
        )

    def _checks(self, facts: _Facts) -> tuple[Check, ...]:
        redis = Check(
            "redis", "ok", f"Redis {facts.version}, {facts.depth} jobs waiting in {self.queue_name}"
        )
        if facts.policy == "noeviction":
            return redis, Check("redis maxmemory-policy", "ok", str(facts.policy))
        return redis, Check(
            "redis maxmemory-policy",
            "fail",
            f"{facts.policy}: Redis may evict queued jobs silently",
            "redis-cli CONFIG SET maxmemory-policy noeviction (and set it in redis.conf)",
        )

    def _seen(self, facts: _Facts) -> str | None:
        if facts.health is None:
            return None
        valid = "" if facts.ttl is None else f" (valid {facts.ttl:.0f} s more)"
        return f"a worker refreshed {self.health_key}{valid}: {facts.health}"
