"""The `webhook` sink against a real local aiohttp server; a route to nats+webhook."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.exceptions import WebhookVerificationError

from outbox_relay.devtools.embedded import free_port
from outbox_relay.devtools.nats_server import EmbeddedNats
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.settings import Settings
from tests.conftest import OutboxEnv
from tests.helpers import count_status, running_relay, running_worker, wait_until
from tests.integration.sinks_support import (
    SECRET,
    insert_events,
    make_stream,
    migrate_sinks,
    receiving,
    routed_registry,
    stream_contents,
)


def hook_settings(
    env: OutboxEnv, url: str, nats: dict[str, Any] | None = None, **overrides: Any
) -> tuple[Settings, HandlerRegistry]:
    """Settings routing ev.* to the webhook sink at ``url``, and the registry the edge builds."""
    settings = env.settings(**{"routes": "ev.*=webhook", **overrides})
    webhook = {"url": url, "secret": SECRET, "timeout": 1.0}
    return settings, routed_registry(settings, webhook=webhook, nats=nats or {})


async def _done(service: Any, n: int) -> bool:
    return await count_status(service, "finished", "failed") == n


async def test_webhook_signatures_verify_with_the_standard_webhooks_reference(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """Every POST carries webhook-id = correlation id and a signature the standardwebhooks
    package's verify accepts; the body is the event JSON."""
    async with receiving() as receiver:
        settings, registry = hook_settings(outbox_env, receiver.url)
        await migrate_sinks(outbox_env.service_url, registry)
        cids = await insert_events(service, "sig", 20)
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(lambda: _done(service, 20), timeout=60, message="20 rows done")
    assert await count_status(service, "finished") == 20
    assert sorted(h["webhook-id"] for _, h, _ in receiver.requests) == sorted(cids)
    verifier = Webhook(SECRET)
    for _, headers, body in receiver.requests:
        event = verifier.verify(body, headers)
        assert event["correlation_id"] == headers["webhook-id"]
        assert set(event) == {"correlation_id", "kind", "outcome", "payload", "created_at"}
        assert headers["content-type"] == "application/json"
    forged = dict(receiver.requests[0][1])
    tampered = receiver.requests[0][2].replace(b"success", b"failure")
    with pytest.raises(WebhookVerificationError, match="signature"):
        verifier.verify(tampered, forged)


async def test_webhook_status_rules(outbox_env: OutboxEnv, service: Any) -> None:
    """2xx finishes; 408, 429 and 5xx (Retry-After honoured) and a timeout are retried; other
    4xx fail at once with the status in last_error."""
    async with receiving() as receiver:
        receiver.script = {
            "st-0": [(204, None)],
            "st-1": [(503, "2")],
            "st-2": [(429, "1"), (500, None)],
            "st-3": [(408, None)],
            "st-4": [(404, None)],
            "st-5": [(400, None)],
            "st-6": [(302, None)],
        }
        receiver.stall = {"st-7": 3.0}  # longer than WEBHOOK_TIMEOUT (1 s)
        settings, registry = hook_settings(outbox_env, receiver.url)
        await migrate_sinks(outbox_env.service_url, registry)
        await insert_events(service, "st", 8)
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(lambda: _done(service, 8), timeout=60, message="8 rows done")
    rows = {
        r["correlation_id"]: r
        for r in await service.fetch(
            "SELECT correlation_id, status, attempts, last_error FROM outbox_relay.outbox"
        )
    }
    expected = {
        "st-0": ("finished", 1),
        "st-1": ("finished", 2),
        "st-2": ("finished", 3),
        "st-3": ("finished", 2),
        "st-4": ("failed", 1),
        "st-5": ("failed", 1),
        "st-6": ("failed", 1),
        "st-7": ("finished", 2),
    }
    assert {cid: (r["status"], r["attempts"]) for cid, r in rows.items()} == expected
    assert "404" in rows["st-4"]["last_error"]
    assert "400" in rows["st-5"]["last_error"]
    for cid, attempts in (("st-1", 2), ("st-2", 3), ("st-3", 2), ("st-7", 2)):
        assert len(receiver.for_id(cid)) == attempts
    # The backoff here is 0.05-0.2 s: the gaps below are the Retry-After values.
    first, second = (t for t, _, _ in receiver.for_id("st-1"))
    assert second - first >= 2.0
    times = [t for t, _, _ in receiver.for_id("st-2")]
    assert times[1] - times[0] >= 1.0
    assert times[2] - times[1] < 1.0


async def test_an_unreachable_webhook_is_transient(outbox_env: OutboxEnv, service: Any) -> None:
    """Nothing listening on the URL: attempts are counted and retried until MAX_ATTEMPTS, the
    error saying the webhook is unreachable (and never the secret)."""
    settings, registry = hook_settings(outbox_env, f"http://127.0.0.1:{free_port()}/hook", max_attempts=3)
    await migrate_sinks(outbox_env.service_url, registry)
    await insert_events(service, "down", 1)
    async with running_worker(settings, registry), running_relay(settings):
        await wait_until(lambda: count_status(service, "failed"), timeout=30, message="row failed")
    row = await service.fetchrow("SELECT attempts, last_error FROM outbox_relay.outbox")
    assert row["attempts"] == 3
    assert "webhook unreachable" in row["last_error"]
    assert SECRET not in row["last_error"]


async def test_a_multi_sink_route_redelivers_only_to_the_sink_that_failed(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """ev.*=nats+webhook with the nats-server away at first: each attempt posts to the webhook
    only until it has acknowledged; once NATS is back every row finishes, the webhook got each
    event exactly once, the stream holds each once, and both deliveries are recorded."""
    server = EmbeddedNats()
    prefix = f"m{uuid.uuid4().hex[:8]}."
    try:
        server.start()  # make the stream in the store, then take the server away
        stream = await make_stream(server.url, [f"{prefix}>"])
        server.kill()
        async with receiving() as receiver:
            settings, registry = hook_settings(
                outbox_env,
                receiver.url,
                routes="ev.*=nats+webhook",
                nats={"url": server.url, "subject_prefix": prefix, "timeout": 0.5},
                max_attempts=100,
            )
            await migrate_sinks(outbox_env.service_url, registry)
            cids = await insert_events(service, "multi", 20)
            async with running_worker(settings, registry), running_relay(settings):
                await wait_until(
                    lambda: service.fetchval(
                        "SELECT count(*) = 20 FROM outbox_relay.outbox WHERE attempts >= 2"
                        " AND last_error LIKE 'nats:%'"
                    ),
                    timeout=60,
                    message="every row retried for nats",
                )
                server.start()
                await wait_until(lambda: _done(service, 20), timeout=60, message="20 rows done")
        assert await count_status(service, "finished") == 20
        assert sorted(h["webhook-id"] for _, h, _ in receiver.requests) == sorted(cids)
        contents = await stream_contents(server.url, stream)
        assert sorted(h["Nats-Msg-Id"] for _, h, _ in contents) == sorted(cids)
        assert json.loads(contents[0][2]) == json.loads(receiver.for_id(contents[0][1]["Nats-Msg-Id"])[0][2])
        recorded = await service.fetch(
            "SELECT sink, count(*) AS n FROM outbox_relay_sinks.deliveries GROUP BY sink"
        )
        assert {r["sink"]: r["n"] for r in recorded} == {"nats": 20, "webhook": 20}
    finally:
        server.cleanup()
