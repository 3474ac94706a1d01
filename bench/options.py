"""What the bench measures and how much: :class:`BenchOptions` (the flags of `./dev bench`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchOptions:
    """Sizes of each measurement."""

    events: int = 10_000
    workers: int = 2
    scaling: tuple[int, ...] = (1, 2, 4)
    producers: int = 4
    latency_rates: tuple[float, ...] = (100.0,)
    latency_seconds: float = 6.0
    #: Also measure latency at this fraction of the measured capacity (0: not).
    latency_at_capacity: float = 0.5
    backlog: int = 50_000
    table_rows: int = 1_000_000
    json_path: Path | None = None
    use_settings: bool = False
    fsync_off: bool = False
    anchor_seconds: float = 5.0
    idle_seconds: float = 30.0
    #: Also drain the backlog with one row per job (the shape before batching).
    backlog_per_row: bool = True
    #: Events through each sink route (nats, rabbitmq, webhook; webhook at 50 ms with 1 and 2
    #: workers), each run committed in one transaction; 0: skip the sink routes.
    sink_events: int = 5_000
    #: The RabbitMQ broker of the rabbitmq route (None: OUTBOX_RELAY_TEST_RABBITMQ_URL, else
    #: guest/guest at 127.0.0.1:5672).
    rabbitmq_url: str | None = None
    #: Rounds of the scaling runs (arq ceiling and end to end per worker count), interleaved.
    rounds: int = 3
    #: Ledger accounts the reservations are spread over (round robin). 1: every refund
    #: updates one account, which serialises all concurrent batches on its row lock.
    accounts: int = 100
    #: Rows of the backlog each worker count drains in the scaling rounds; 0: skip.
    drain_rows: int = 20_000

    @classmethod
    def quick(
        cls,
        json_path: Path | None = None,
        use_settings: bool = False,
        fsync_off: bool = False,
        accounts: int = 100,
        rabbitmq_url: str | None = None,
    ) -> BenchOptions:
        """A smoke run of a few seconds (what CI runs)."""
        return cls(
            events=300,
            workers=1,
            scaling=(1,),
            producers=2,
            latency_rates=(100.0,),
            latency_seconds=1.0,
            latency_at_capacity=0.0,
            backlog=1_000,
            table_rows=10_000,
            json_path=json_path,
            use_settings=use_settings,
            fsync_off=fsync_off,
            anchor_seconds=1.0,
            idle_seconds=3.0,
            backlog_per_row=False,
            sink_events=200,
            rabbitmq_url=rabbitmq_url,
            accounts=accounts,
            rounds=1,
            drain_rows=500,
        )
