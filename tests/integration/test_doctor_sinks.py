"""`doctor` checks each routed sink and the kinds no live worker routes, and keeps their secrets."""

from __future__ import annotations

import uuid
from typing import Any

from outbox_relay.composition import doctor_config
from outbox_relay.devtools.embedded import free_port
from outbox_relay.devtools.nats_server import EmbeddedNats
from outbox_relay.doctor import run_doctor
from tests.conftest import OutboxEnv
from tests.helpers import running_worker, wait_until
from tests.integration.sinks_support import SECRET, insert_events, make_stream, receiving, routed_registry


async def test_doctor_checks_the_routed_sinks_and_names_what_is_missing(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """A NATS server without a stream for one routed kind and a webhook host refusing connections:
    `nats streams` and `webhook` fail naming the subject and the host; no secret is printed."""
    prefix = f"d{uuid.uuid4().hex[:8]}."
    with EmbeddedNats() as server:
        await make_stream(server.url, [f"{prefix}ev.>"])
        dead = f"http://hook:s3cr3t-pass@127.0.0.1:{free_port()}/hook?token=t0k3n"
        settings = outbox_env.settings(routes="ev.*=nats+webhook, audit.*=nats")
        registry = routed_registry(
            settings,
            nats={"url": server.url, "subject_prefix": prefix},
            webhook={"url": dead, "secret": SECRET},
        )
        await insert_events(service, "a", 1, kind="ev.created")
        await insert_events(service, "b", 1, kind="audit.login")
        report = await run_doctor(doctor_config(settings, registry))
    lines = {c.name: c for c in report.checks}
    assert lines["nats"].status == "ok"
    assert lines["nats streams"].status == "fail"
    assert f"{prefix}audit.login" in lines["nats streams"].detail
    assert f"{prefix}ev.created" not in lines["nats streams"].detail
    assert lines["webhook"].status == "fail"
    assert "127.0.0.1" in lines["webhook"].detail
    text = report.as_text()
    for secret in ("s3cr3t-pass", "t0k3n", SECRET):
        assert secret not in text


async def test_doctor_warns_of_pending_kinds_no_live_worker_routes(
    outbox_env: OutboxEnv, service: Any
) -> None:
    """With a live worker routing only ev.*, pending `audit.*` rows are named in a `routed kinds` warning."""
    async with receiving() as receiver:
        settings = outbox_env.settings(routes="ev.*=webhook")
        registry = routed_registry(settings, webhook={"url": receiver.url, "secret": SECRET})
        async with running_worker(settings, registry):
            await wait_until(
                lambda: service.fetchval("SELECT count(*) = 1 FROM outbox_relay.workers"),
                timeout=20,
                message="the worker listed",
            )
            await insert_events(service, "lost", 3, kind="audit.login")
            report = await run_doctor(doctor_config(settings, registry))
    line = next(c for c in report.checks if c.name == "routed kinds")
    assert line.status == "warn"
    assert "audit.login (3 rows)" in line.detail
