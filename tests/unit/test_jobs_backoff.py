"""Job ids and backoff: namespaced, stable ids; capped jittered delays; the retry loop."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time

import pytest

from outbox_relay.arq_adapter import job_id
from outbox_relay.exceptions import UnavailableError
from outbox_relay.identity import job_namespace
from outbox_relay.logs import describe
from outbox_relay.retry import Backoff, retry

PASSWORD = "hunter2-s3cret"
logger = logging.getLogger("outbox_relay.test_retry")


# -- job ids ----------------------------------------------------------------------------


def test_job_id_is_namespaced_by_queue() -> None:
    """The same correlation id in two services' queues gives two different job ids."""
    first = job_id(job_namespace("orders"), "job-42")
    second = job_id(job_namespace("billing"), "job-42")
    assert first != second
    assert "job-42" in first


def test_job_id_is_stable() -> None:
    """The same row always gets the same id, so the relay never queues it twice."""
    namespace = job_namespace("orders")
    assert job_id(namespace, "job-42") == job_id(namespace, "job-42")
    assert job_id(namespace, "job-42", 3) == job_id(namespace, "job-42", 3)


def test_job_id_changes_with_generation() -> None:
    """A requeued row (generation > 0) gets a new id at each requeue."""
    namespace = job_namespace("orders")
    ids = {job_id(namespace, "job-42", generation) for generation in range(4)}
    assert len(ids) == 4


def test_job_id_never_collides_across_queues_ids_and_generations() -> None:
    """Distinct (queue, correlation id, generation) triples never share a job id, even with ':' and '#'."""
    queues = ["a", "a:b", "a#1", "b", "outbox_relay"]
    correlation_ids = ["x", "b:x", "x#1", "1:x", "x#", "%", "%23", "#", ":", "a:b:x"]
    seen: dict[str, tuple[str, str, int]] = {}
    for queue, cid, generation in itertools.product(queues, correlation_ids, range(3)):
        jid = job_id(job_namespace(queue), cid, generation)
        assert jid not in seen, f"{(queue, cid, generation)} and {seen[jid]} share job id {jid!r}"
        seen[jid] = (queue, cid, generation)


# -- Backoff ----------------------------------------------------------------------------


def test_backoff_grows_exponentially_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without jitter the delays double from initial and stop at maximum."""
    monkeypatch.setattr(random, "uniform", lambda low, high: 1.0)
    delays = Backoff(0.1, 1.0)
    assert [round(delays.next_delay(), 6) for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_backoff_jitter_stays_within_twenty_percent() -> None:
    """Every delay lies within ±20 % of its un-jittered value, and the jitter does vary."""
    samples: list[float] = []
    for _ in range(200):
        delays = Backoff(1.0, 4.0)
        for expected in (1.0, 2.0, 4.0, 4.0):
            delay = delays.next_delay()
            assert 0.8 * expected <= delay <= 1.2 * expected
        samples.append(delay / 4.0)
    assert len(set(samples)) > 1, "no jitter at all"
    assert min(samples) < 0.95, "jitter far narrower than -20 %"
    assert max(samples) > 1.05, "jitter far narrower than +20 %"


def test_backoff_jitter_uses_the_full_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jitter factor is drawn from [0.8, 1.2], so the extremes are reachable."""
    bounds: list[tuple[float, float]] = []

    def highest(low: float, high: float) -> float:
        bounds.append((low, high))
        return high

    monkeypatch.setattr(random, "uniform", highest)
    assert Backoff(2.0, 10.0).next_delay() == pytest.approx(2.4)
    monkeypatch.setattr(random, "uniform", lambda low, high: low)
    assert Backoff(2.0, 10.0).next_delay() == pytest.approx(1.6)
    assert bounds == [(0.8, 1.2)]


def test_backoff_reset_restarts_from_initial(monkeypatch: pytest.MonkeyPatch) -> None:
    """After reset() the next delay is the initial one again."""
    monkeypatch.setattr(random, "uniform", lambda low, high: 1.0)
    delays = Backoff(0.5, 8.0)
    for _ in range(5):
        delays.next_delay()
    assert delays.attempt == 5
    delays.reset()
    assert delays.attempt == 0
    assert delays.next_delay() == 0.5


# -- describe ---------------------------------------------------------------------------


def test_describe_gives_one_line_without_secrets() -> None:
    """describe() is 'Type: first line', with URL passwords scrubbed."""
    exc = OSError(f"cannot connect to postgresql://svc:{PASSWORD}@db.example/svc\nDETAIL: more\nand more")
    text = describe(exc)
    assert text == "OSError: cannot connect to postgresql://svc:***@db.example/svc"
    assert "\n" not in text


def test_describe_of_an_exception_without_message_is_its_type() -> None:
    """An exception with no message is described by its type name alone."""
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("   ")) == "ValueError"


# -- retry ------------------------------------------------------------------------------


def tiny_backoff() -> Backoff:
    """Millisecond delays: the retry loop runs many times in a few milliseconds."""
    return Backoff(0.001, 0.002)


async def test_retry_returns_the_value_once_the_operation_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    """Two failures then a success: retry returns the value and logs one plain, scrubbed line per failure."""
    calls = 0

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionRefusedError(f"redis://:{PASSWORD}@cache/0 refused")
        return 42

    with caplog.at_level(logging.WARNING, logger=logger.name):
        result = await retry(flaky, what="Redis", logger=logger, give_up_after=None, backoff=tiny_backoff())
    assert result == 42
    assert calls == 3
    records = [r for r in caplog.records if r.name == logger.name]
    assert len(records) == 2
    for record in records:
        assert record.exc_info is None, "a retry line must not carry a traceback"
        assert "Redis" in record.getMessage()
        assert PASSWORD not in str(vars(record))


async def test_retry_gives_up_with_unavailable_error_after_the_window() -> None:
    """An operation that keeps failing ends in UnavailableError naming what and why, after several tries."""
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise OSError(f"postgresql://svc:{PASSWORD}@db.example/svc: connection refused")

    started = time.monotonic()
    with pytest.raises(UnavailableError) as caught:
        await retry(
            down, what="the service database", logger=logger, give_up_after=0.05, backoff=tiny_backoff()
        )
    assert time.monotonic() - started < 1.0
    assert calls > 1
    message = str(caught.value)
    assert "the service database" in message
    assert "connection refused" in message
    assert PASSWORD not in message


async def test_retry_with_no_window_tries_exactly_once() -> None:
    """give_up_after=0 means one attempt, then UnavailableError."""
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise TimeoutError

    with pytest.raises(UnavailableError, match="TimeoutError"):
        await retry(down, what="Redis", logger=logger, give_up_after=0.0, backoff=tiny_backoff())
    assert calls == 1


async def test_retry_does_not_retry_errors_outside_retry_on() -> None:
    """An exception not listed in retry_on propagates at once, unchanged."""
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await retry(broken, what="x", logger=logger, give_up_after=None, retry_on=(OSError,))
    assert calls == 1


async def test_retry_raises_cancelled_promptly_when_stop_is_set_while_waiting() -> None:
    """With a 30 s backoff pending, setting stop ends retry at once with CancelledError."""
    stop = asyncio.Event()
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        asyncio.get_running_loop().call_soon(stop.set)  # set while retry waits for its backoff
        raise OSError("refused")

    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await retry(down, what="x", logger=logger, give_up_after=None, stop=stop, backoff=Backoff(30, 30))
    assert time.monotonic() - started < 1.0
    assert calls == 1
