"""The worker (`worker`): the service loop and the row processor it runs for each job."""

from __future__ import annotations

from outbox_relay.worker.processor import RowProcessor, WorkerConfig
from outbox_relay.worker.service import run_worker

__all__ = ["RowProcessor", "WorkerConfig", "run_worker"]
