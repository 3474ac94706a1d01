"""What `doctor` needs to know about the queue's Redis, read without changing anything."""

from __future__ import annotations

from typing import Any

from arq.constants import health_check_key_suffix
from redis.exceptions import RedisError

from outbox_relay.arq_adapter.producer import redis_client
from outbox_relay.logs import describe


async def redis_facts(url: str, queue_name: str) -> dict[str, Any]:
    """Facts about the Redis at ``url`` for the queue ``queue_name``.

    Keys: ``reachable`` (bool), ``error`` (why not, or None), ``version``,
    ``maxmemory_policy`` (from ``INFO memory``, which works where a managed
    Redis disables ``CONFIG``), ``queue_depth`` (jobs waiting), and the arq
    workers' health-check key of the queue: ``worker_health_key``,
    ``worker_health`` (its value, or None when no worker refreshed it within
    its TTL) and ``worker_health_ttl`` (seconds left).
    """
    key = queue_name + health_check_key_suffix
    facts: dict[str, Any] = {
        "reachable": False,
        "error": None,
        "version": None,
        "maxmemory_policy": None,
        "queue_depth": None,
        "worker_health_key": key,
        "worker_health": None,
        "worker_health_ttl": None,
    }
    redis = redis_client(url, queue_name=queue_name, max_connections=2)
    try:
        server = await redis.info("server")
        memory = await redis.info("memory")
        facts["reachable"] = True
        facts["version"] = server.get("redis_version")
        facts["maxmemory_policy"] = memory.get("maxmemory_policy")
        facts["queue_depth"] = int(await redis.zcard(queue_name))
        health = await redis.get(key)
        if health is not None:
            facts["worker_health"] = health.decode(errors="replace")
            ttl_ms = int(await redis.pttl(key))
            facts["worker_health_ttl"] = ttl_ms / 1000 if ttl_ms >= 0 else None
    except (RedisError, OSError, TimeoutError) as exc:
        facts["error"] = describe(exc)
    finally:
        await redis.aclose(close_connection_pool=True)
    return facts
