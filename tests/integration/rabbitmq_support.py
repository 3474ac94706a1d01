"""The rabbitmq sink tests' own pieces: exchanges and queues of a test's own on the shared broker, reading
them back, and a TCP forwarder in front of the broker that a test closes and reopens (the broker itself
is shared: never stopped by a test)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from outbox_relay.devtools.embedded import free_port


@dataclass(frozen=True)
class Topology:
    """A durable topic exchange and a durable queue bound to it, both of one test's own."""

    exchange: str
    queue: str


def unique(word: str) -> str:
    """A name of this test's own."""
    return f"t-{word}-{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def amqp(url: str) -> AsyncIterator[AbstractConnection]:
    """The test's own connection."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        yield connection
    finally:
        await connection.close()


async def declare(url: str, exchange: str, bindings: Sequence[str], queue: str | None = None) -> Topology:
    """Declare ``exchange`` (topic, durable) and a durable queue bound to it by ``bindings``."""
    queue = queue or unique("q")
    async with amqp(url) as connection:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await channel.declare_queue(queue, durable=True)
        for key in bindings:
            await q.bind(ex, key)
    return Topology(exchange, queue)


@contextlib.asynccontextmanager
async def topology(url: str, bindings: Sequence[str] = ("ev.#",)) -> AsyncIterator[Topology]:
    """A :class:`Topology` for the block; exchange and queue deleted after."""
    made = Topology(unique("x"), unique("q"))
    try:
        yield await declare(url, made.exchange, bindings, made.queue)
    finally:
        await delete(url, made)


async def delete(url: str, made: Topology) -> None:
    """Delete the queue and the exchange (whether or not they exist)."""
    async with amqp(url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(made.queue)
        await channel.exchange_delete(made.exchange)


async def depth(url: str, queue: str) -> int:
    """How many messages ``queue`` holds."""
    async with amqp(url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def drain(url: str, queue: str) -> list[AbstractIncomingMessage]:
    """Every message of ``queue``, taken off it."""
    found: list[AbstractIncomingMessage] = []
    async with amqp(url) as connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(no_ack=True, fail=False, timeout=10)) is not None:
            found.append(message)
    return found


@dataclass
class Forwarder:
    """A TCP forwarder on 127.0.0.1 in front of ``target``: :meth:`close` stops listening and cuts every
    connection (the broker is away for the sink); :meth:`open` listens again on the same port."""

    target: str
    port: int = field(default_factory=free_port)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def url(self) -> str:
        """``target`` with the forwarder's address instead of the broker's."""
        parts = urlsplit(self.target)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        parts = urlsplit(self.target)
        try:
            broker_reader, broker_writer = await asyncio.open_connection(
                parts.hostname or "127.0.0.1", parts.port or 5672
            )
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, broker_writer}
        await asyncio.gather(
            _pipe(client_reader, broker_writer), _pipe(broker_reader, client_writer), return_exceptions=True
        )
        for writer in (client_writer, broker_writer):
            self._writers.discard(writer)
            writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


@contextlib.asynccontextmanager
async def forwarding(target: str) -> AsyncIterator[Forwarder]:
    """An open :class:`Forwarder` for the block."""
    forwarder = Forwarder(target)
    await forwarder.open()
    try:
        yield forwarder
    finally:
        await forwarder.close()


@contextlib.asynccontextmanager
async def silent() -> AsyncIterator[str]:
    """A server on 127.0.0.1 that takes connections and never answers (a broker hung or blackholed);
    its ``amqp://`` URL."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"amqp://guest:guest@127.0.0.1:{port}/"
    finally:
        server.close()
        for writer in held:
            writer.transport.abort()
        await server.wait_closed()


def message_ids(messages: Sequence[Any]) -> list[str]:
    """The ``message_id`` of each message."""
    return [str(m.message_id) for m in messages]
