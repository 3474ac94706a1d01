"""The conformance suite's one fixture: each test runs once per implementation of the queue port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conformance.backends import ArqBackend, Backend, MemoryBackend
from tests.servers import RedisServer


def _redis(request: pytest.FixtureRequest) -> RedisServer:
    """The session's Redis (tests/conftest.py); a test is skipped only when none can be had."""
    try:
        server: RedisServer = request.getfixturevalue("redis_server")
    except Exception as exc:  # no server given, no Docker image, no embedded binary
        pytest.skip(f"no Redis server for the arq backend: {exc}")
    return server


@pytest.fixture(params=["memory", "arq"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A fresh queue of one implementation (arq: a queue name of its own on the session's Redis);
    its producers and consumers are closed, and its keys removed, after the test."""
    made: Backend = MemoryBackend() if request.param == "memory" else ArqBackend(_redis(request))
    try:
        yield made
    finally:
        await made.close()
