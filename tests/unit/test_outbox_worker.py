"""The worker's claim order: skip jobs it already runs, shuffle the rest (no servers)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from arq.worker import Worker

from outbox_relay.arq_adapter.consumer import OutboxWorker


def _worker() -> OutboxWorker:
    async def job(ctx: dict[str, Any]) -> None:
        return None

    return OutboxWorker(functions=[job], queue_name="q", redis_pool=object(), handle_signals=False)  # type: ignore[arg-type]


async def test_start_jobs_skips_jobs_this_worker_is_already_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids of jobs running in this worker never reach arq's per-job WATCH/MULTI claim."""
    seen: list[list[bytes]] = []

    async def record(self: Worker, job_ids: list[bytes]) -> None:
        seen.append(list(job_ids))

    monkeypatch.setattr(Worker, "start_jobs", record)
    worker = _worker()
    worker.tasks = {"running-1": asyncio.get_running_loop().create_future(), "running-2": asyncio.Future()}
    await worker.start_jobs([b"running-1", b"new-1", b"running-2", b"new-2", b"new-3"])
    assert len(seen) == 1
    assert sorted(seen[0]) == [b"new-1", b"new-2", b"new-3"]


async def test_start_jobs_claims_each_window_in_varying_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers reading the same window do not try its jobs in the same order every time."""
    seen: list[list[bytes]] = []

    async def record(self: Worker, job_ids: list[bytes]) -> None:
        seen.append(list(job_ids))

    monkeypatch.setattr(Worker, "start_jobs", record)
    worker = _worker()
    window = [f"job-{i}".encode() for i in range(50)]
    for _ in range(5):
        await worker.start_jobs(list(window))
    assert all(sorted(order) == sorted(window) for order in seen)
    assert len({tuple(order) for order in seen}) > 1
