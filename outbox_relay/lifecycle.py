"""Process life: the event loop, the stop event that signals set, and waiting on it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop (asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set (signals do nothing else)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``stop``; True when it is set (the caller should end)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def raise_if_cancelling() -> None:
    """Honour a cancellation that was swallowed on the way.

    On Python 3.11 ``asyncio.wait_for`` (which some queue clients run around every command)
    can eat a cancellation that arrives as the command completes: a task that lost
    its reason to run (a relay that lost its lock) must still stop at once.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], *, every: float = 0.5) -> None:
    """Cancel ``task`` and wait for its end, cancelling again while it goes on (see
    :func:`raise_if_cancelling` for why one ``cancel()`` may not be enough)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    if not task.cancelled():
        task.exception()  # retrieve it: on stop, nothing is left to report


async def supervise(tasks: Mapping[str, Coroutine[Any, Any, None]], stop: asyncio.Event) -> None:
    """Run named tasks together until ``stop`` is set or one of them ends.

    On ``stop`` every task is cancelled and this returns. When a task fails,
    the others are cancelled and its exception is raised; a task that returns
    while the others run is a bug and raises :class:`RuntimeError` naming it.
    """
    running: dict[asyncio.Task[Any], str] = {
        asyncio.create_task(coro, name=name): name for name, coro in tasks.items()
    }
    stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait(), name="supervise.stop")
    try:
        done, _ = await asyncio.wait({*running, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in [*running, stopper]:
            if not task.done():
                await cancel_and_wait(task)
    ended = [task for task in done if task is not stopper]
    if not ended:
        return
    failed = next((t for t in ended if not t.cancelled() and t.exception() is not None), None)
    for task in running:  # retrieve every outcome: nothing is reported twice or lost
        if task.done() and not task.cancelled():
            task.exception()
    if failed is not None:
        error = failed.exception()
        assert error is not None
        raise error
    if stop.is_set():
        return
    task = ended[0]
    if task.cancelled():
        raise asyncio.CancelledError
    raise RuntimeError(f"task {running[task]} ended on its own")
