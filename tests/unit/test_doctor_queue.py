"""`doctor` and the queue port's seam: the queue backend names its own lines, doctor knows no server."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Sequence
from pathlib import Path

import outbox_relay.doctor
from outbox_relay.doctor import DoctorConfig, run_doctor
from outbox_relay.queue import Job, Outcome
from outbox_relay.queue.memory import InMemoryQueue

DOCTOR = Path(outbox_relay.doctor.__file__)


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_doctor_imports_no_queue_adapter_and_names_no_server() -> None:
    """doctor.py imports no adapter (not even inside a function) and never says "Redis" itself."""
    assert not {name for name in _imported(DOCTOR) if name.startswith("outbox_relay.arq_adapter")}
    assert "redis" not in DOCTOR.read_text().lower()


async def test_the_in_memory_queue_diagnoses_itself_and_its_consumer() -> None:
    """In memory: always reachable, one `queue` line with the jobs waiting; a running consumer is a worker."""
    queue = InMemoryQueue("diag")
    idle = await queue.diagnose()
    assert idle.reachable
    assert [(c.name, c.status, c.detail) for c in idle.checks] == [
        ("queue", "ok", "in memory, 0 jobs waiting")
    ]
    assert idle.workers_seen is None

    started, stop = asyncio.Event(), asyncio.Event()

    async def function(jobs: Sequence[Job]) -> list[Outcome]:
        return [Outcome("finished") for _ in jobs]

    class Observer:
        def beat(self) -> None:
            started.set()

        def not_ready(self, reason: str) -> None: ...

        def foreign_job(self, job_database: str, own: str) -> None: ...

    consumer = asyncio.create_task(queue.run(function, stop, observer=Observer()))
    await started.wait()
    assert (await queue.diagnose()).workers_seen is not None
    stop.set()
    await consumer
    assert (await queue.diagnose()).workers_seen is None


async def test_doctor_prints_the_backends_lines_and_the_workers_line() -> None:
    """With the database unreachable, doctor still reports the queue: the backend's line, workers, clocks."""
    config = DoctorConfig(
        database_url="postgresql://doctor@127.0.0.1:1/nothing",
        queue=lambda name: InMemoryQueue(name),
        queue_name="q",
        requeue_after=60.0,
    )
    report = await run_doctor(config)
    names = [(c.name, c.status) for c in report.checks]
    assert names == [("service database", "fail"), ("queue", "ok"), ("workers", "fail"), ("clocks", "ok")]
    assert report.checks[-2].detail == "no live worker for queue q"
    assert report.checks[-1].detail.startswith("PostgreSQL unknown, "), report.checks[-1]
