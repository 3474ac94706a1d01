"""The active relay reports its progress in one structured log line per interval."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from outbox_relay.relay import report as relay_module
from tests.conftest import OutboxEnv
from tests.helpers import produce, running_relay, wait_until


async def test_relay_logs_one_progress_line_with_the_rows_handed_over(
    outbox_env: OutboxEnv, service: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After rows move, a 'relay progress' line says how many were handed over; idle, no line."""
    monkeypatch.setattr(relay_module, "REPORT_INTERVAL", 0.2)
    caplog.set_level(logging.INFO, logger="outbox_relay.relay")
    settings = outbox_env.settings(sweep_interval=0.1)

    def progress() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "relay progress"]

    async with running_relay(settings) as relay:
        await wait_until(lambda: relay.active.is_set(), message="relay active")
        for index in range(3):
            await produce(service, f"report-{index}")
        await wait_until(lambda: bool(progress()), timeout=10, message="a progress line")
        await wait_until(lambda: relay.stats.handed_over == 3, message="3 rows handed over")
        first = progress()
        assert sum(getattr(r, "handed_over", 0) for r in first) == 3
        seen = len(first)
        # Idle: ten more sweeps (> 1 s, five report intervals) hand nothing over and log no line.
        sweeps = relay.stats.sweeps
        await wait_until(lambda: relay.stats.sweeps >= sweeps + 10, message="ten idle sweeps")
        assert relay.stats.handed_over == 3
        assert len(progress()) == seen
