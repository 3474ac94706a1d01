"""The `nats` sink against a real nats-server (JetStream) started by these tests."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from outbox_relay.devtools.nats_server import EmbeddedNats
from outbox_relay.handlers import HandlerRegistry
from outbox_relay.settings import Settings
from tests.conftest import OutboxEnv
from tests.helpers import count_status, equals, running_relay, running_worker, wait_until
from tests.integration.sinks_support import (
    all_finished,
    insert_events,
    make_stream,
    migrate_sinks,
    routed_registry,
    stream_contents,
    stream_messages,
    worker_killed_mid_stream,
)


@pytest.fixture(scope="module")
def nats_server() -> Iterator[EmbeddedNats]:
    """A nats-server with JetStream on a port of its own (not the machine's 4222)."""
    server = EmbeddedNats()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def prefix() -> str:
    """A subject prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:10]}."


def nats_settings(
    env: OutboxEnv, server: EmbeddedNats, prefix: str, **overrides: Any
) -> tuple[Settings, HandlerRegistry]:
    """Settings routing ev.* to the nats sink of ``server``, and the registry the edge builds."""
    settings = env.settings(**{"routes": "ev.*=nats", **overrides})
    nats = {"url": server.url, "subject_prefix": prefix, "timeout": 1.0}
    return settings, routed_registry(settings, nats=nats)


async def test_n_rows_make_exactly_n_messages_in_the_stream(
    outbox_env: OutboxEnv, service: Any, nats_server: EmbeddedNats, prefix: str
) -> None:
    """200 routed rows finish, and the stream holds exactly 200 messages: the event JSON, on
    prefix + kind, with Nats-Msg-Id = the correlation id."""
    stream = await make_stream(nats_server.url, [f"{prefix}>"])
    settings, registry = nats_settings(outbox_env, nats_server, prefix)
    await migrate_sinks(outbox_env.service_url, registry)
    cids = await insert_events(service, "n", 200)
    async with running_worker(settings, registry), running_relay(settings):
        await wait_until(lambda: all_finished(service, 200), timeout=60, message="200 rows finished")
    assert await stream_messages(nats_server.url, stream) == 200
    contents = await stream_contents(nats_server.url, stream)
    assert sorted(h["Nats-Msg-Id"] for _, h, _ in contents) == sorted(cids)
    subject, headers, data = contents[0]
    assert subject == f"{prefix}ev.created"
    event = json.loads(data)
    assert set(event) == {"correlation_id", "kind", "outcome", "payload", "created_at"}
    assert event["correlation_id"] == headers["Nats-Msg-Id"]
    assert event["kind"] == "ev.created"
    assert event["outcome"] == "success"
    assert datetime.fromisoformat(event["created_at"]).utcoffset() is not None


async def test_no_stream_for_the_subject_is_a_permanent_failure_naming_it(
    outbox_env: OutboxEnv, service: Any, nats_server: EmbeddedNats, prefix: str
) -> None:
    """A routed kind whose subject no stream binds fails at once, last_error naming the subject."""
    await make_stream(nats_server.url, [f"{prefix}ev.>"])
    settings, registry = nats_settings(outbox_env, nats_server, prefix, routes="ev.*=nats,other=nats")
    await migrate_sinks(outbox_env.service_url, registry)
    await insert_events(service, "nostream", 1, kind="other")
    async with running_worker(settings, registry), running_relay(settings):
        await wait_until(lambda: count_status(service, "failed"), timeout=30, message="row failed")
    row = await service.fetchrow("SELECT attempts, last_error FROM outbox_relay.outbox")
    assert row["attempts"] == 1
    assert f"{prefix}other" in row["last_error"]
    assert "no JetStream stream" in row["last_error"]


async def test_a_broker_down_for_30_s_loses_nothing(outbox_env: OutboxEnv, service: Any, prefix: str) -> None:
    """With the nats-server SIGKILLed for 30 s mid-flow, attempts fail transiently; once it is back
    (same port, same store) every row finishes and the stream holds each event exactly once."""
    server = EmbeddedNats()
    server.start()
    try:
        stream = await make_stream(server.url, [f"{prefix}>"])
        settings, registry = nats_settings(
            outbox_env, server, prefix, max_attempts=100, retry_backoff=0.2, retry_backoff_max=2.0
        )
        await migrate_sinks(outbox_env.service_url, registry)
        await insert_events(service, "before", 50)
        async with running_worker(settings, registry), running_relay(settings):
            await wait_until(lambda: all_finished(service, 50), timeout=60, message="first 50 finished")
            server.kill()
            await insert_events(service, "during", 50)
            down_since = time.monotonic()
            await wait_until(
                lambda: service.fetchval(
                    "SELECT count(*) >= 10 FROM outbox_relay.outbox"
                    " WHERE status = 'queued' AND last_error LIKE '%NATS%'"
                ),
                timeout=30,
                message="attempts failing transiently while the broker is down",
            )
            # The outage itself lasts 30 s (this is the fault, not a synchronisation).
            await asyncio.sleep(max(0.0, 30.0 - (time.monotonic() - down_since)))
            assert await count_status(service, "failed") == 0
            server.start()
            await wait_until(lambda: all_finished(service, 100), timeout=90, message="all 100 finished")
        assert await count_status(service, "failed") == 0
        assert await stream_messages(server.url, stream) == 100
    finally:
        server.cleanup()


@pytest.mark.slow
async def test_a_worker_sigkilled_mid_stream_leaves_exactly_n_messages(
    outbox_env: OutboxEnv, service: Any, nats_server: EmbeddedNats, prefix: str, tmp_path: Any
) -> None:
    """A `worker` process SIGKILLed while publishing: its jobs run again in another worker, every
    row finishes, and the stream holds each event exactly once (Nats-Msg-Id deduplication)."""
    stream = await make_stream(nats_server.url, [f"{prefix}>"])
    _, registry = nats_settings(outbox_env, nats_server, prefix)
    await migrate_sinks(outbox_env.service_url, registry)
    n = 400
    await insert_events(service, "kill", n)
    sink_env = {"ROUTES": "ev.*=nats", "NATS_URL": nats_server.url, "NATS_SUBJECT_PREFIX": prefix}
    await worker_killed_mid_stream(
        outbox_env,
        service,
        sink_env,
        tmp_path,
        rows=n,
        started=lambda: _at_least(nats_server.url, stream, 50),
        what="50 messages published",
    )
    assert await stream_messages(nats_server.url, stream) == n
    ids = [h["Nats-Msg-Id"] for _, h, _ in await stream_contents(nats_server.url, stream)]
    assert len(set(ids)) == n


async def _at_least(url: str, stream: str, n: int) -> bool:
    return await stream_messages(url, stream) >= n


async def test_an_event_over_max_payload_and_a_huge_kind_fail_at_once_and_others_flow(
    outbox_env: OutboxEnv, service: Any, nats_server: EmbeddedNats, prefix: str
) -> None:
    """A 5 MB payload (over the server's 1 MB max_payload) and a 5,000-character kind (over its
    control-line limit) fail permanently on their first attempt, saying why; the connection the
    worker shares is not dropped: 50 ordinary rows beside them all reach the stream."""
    stream = await make_stream(nats_server.url, [f"{prefix}>"])
    settings, registry = nats_settings(outbox_env, nats_server, prefix, routes="ev.*=nats")
    await service.execute(
        "INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload)"
        " VALUES ('big', 'ev.big', 'success', jsonb_build_object('blob', repeat('x', 5000000))),"
        " ('long', 'ev.' || repeat('k', 5000), 'success', '{}')"
    )
    cids = await insert_events(service, "ok", 50)
    async with running_worker(settings, registry), running_relay(settings):
        await wait_until(
            lambda: equals(count_status(service, "finished", "failed"), 52),
            timeout=60,
            message="52 rows ended",
        )
    failed = {
        r["correlation_id"]: r
        for r in await service.fetch(
            "SELECT correlation_id, attempts, last_error FROM outbox_relay.outbox WHERE status = 'failed'"
        )
    }
    assert set(failed) == {"big", "long"}
    assert failed["big"]["attempts"] == 1
    assert "max_payload" in failed["big"]["last_error"]
    assert failed["long"]["attempts"] == 1
    assert "subject over" in failed["long"]["last_error"]
    contents = await stream_contents(nats_server.url, stream)
    assert sorted(h["Nats-Msg-Id"] for _, h, _ in contents) == sorted(cids)
