"""The `kafka` sink: produce each event to a Kafka-protocol broker, finish the row on its delivery report.

Topic: ``OUTBOX_RELAY_KAFKA_TOPIC_PREFIX`` + the kind (default prefix
``outbox.event.``, the shape of Debezium's outbox event router). Key: the row's
ordering key, or its correlation id when it has none (:func:`record_key`).
Value: the event JSON. Headers: ``id`` (the delivery id: the correlation id,
``<id>#<n>`` after the row's n-th requeue), which consumers deduplicate on,
plus ``kind``, ``correlation_id`` and ``outcome``. Needs the extra
``outbox-relay[kafka]`` (confluent-kafka), imported only when a route names
this sink.

One idempotent producer (``acks=all``) per worker process, created on first
use: confluent-kafka's classic ``Producer``, whose delivery reports a poll loop
on a thread of its own hands to the event loop, one future per record, so that
any number of deliveries are in flight at once (its asyncio producer refuses
headers in batch mode). A topic that does not exist is a permanent failure
naming it, known from the cluster's metadata (cached; asked again at a bounded
rate) and never from the broker refusing: brokers may create topics on produce,
and the relay never creates one. An unreachable broker, or a report that does
not come within ``OUTBOX_RELAY_KAFKA_TIMEOUT``, is transient. A fatal error of
the idempotent producer retires it and the next delivery creates another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from outbox_relay.config import HOUR, SettingsBase, seconds
from outbox_relay.diagnosis import Check
from outbox_relay.events import OutboxEvent
from outbox_relay.exceptions import OutboxRelayError, PermanentError, SettingsError, TransientError
from outbox_relay.logs import scrub
from outbox_relay.sinks import SinkContext, SinkPlugin

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message, Producer

logger = logging.getLogger(__name__)

NAME = "kafka"
#: Kafka's rules for a topic name: these characters, at most this long, and not "." or "..".
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]*$")
MAX_TOPIC_LENGTH = 249
#: One ``host:port`` of the bootstrap list (a name, an IPv4 address or a bracketed IPv6 one).
_SERVER_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
#: A topic found missing is asked about again at most this often (seconds).
MISSING_RECHECK = 1.0
#: Beyond the producer's own message timeout, how long a delivery waits for its report.
REPORT_GRACE = 5.0
#: How long closing the producer waits for the records still in flight (seconds).
CLOSE_TIMEOUT = 5.0
#: How often the producer's queue, when full, is tried again (seconds).
_QUEUE_FULL_PAUSE = 0.01


class KafkaSettings(SettingsBase):
    """The `kafka` sink's settings: ``OUTBOX_RELAY_KAFKA_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="OUTBOX_RELAY_KAFKA_")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", max_length=2000, description="brokers to start from, host:port,..."
    )
    topic_prefix: str = Field(
        default="outbox.event.", max_length=200, description="topic of an event: this prefix + its kind"
    )
    timeout: float = seconds(
        5.0, ge=1.0, le=HOUR, description="wait for the broker's delivery report (seconds)"
    )
    linger_ms: int = Field(default=5, ge=0, le=500, description="how long the producer gathers a batch")
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        default="none", description="compression of the producer's batches"
    )
    message_max_bytes: int = Field(
        default=1_000_000, ge=1000, le=1_000_000_000, description="largest record produced (bytes)"
    )
    metadata_max_age: float = seconds(
        60.0, le=HOUR, description="how long a topic seen to exist is trusted unasked (seconds)"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="how the producer talks to the brokers"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="PLAIN", description="SASL mechanism (with a SASL_* protocol)"
    )
    sasl_username: str | None = Field(default=None, min_length=1, max_length=256, description="SASL user")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password")

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        for server in value.split(","):
            match = _SERVER_RE.match(server.strip())
            if match is None or not 1 <= int(match[2]) <= 65535:
                raise ValueError("must be host:port[,host:port...] with ports from 1 to 65535")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        if not _TOPIC_RE.match(value):
            raise ValueError("may hold only the characters of a Kafka topic: a-z A-Z 0-9 . _ -")
        return value

    @field_validator("sasl_password")
    @classmethod
    def _password_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not 1 <= len(value.get_secret_value()) <= 1024:
            raise ValueError("must be 1 to 1024 characters")
        return value


@dataclass(frozen=True)
class KafkaConfig:
    """What the sink needs (the SASL password left out of ``repr``)."""

    bootstrap_servers: str
    topic_prefix: str
    timeout: float
    linger_ms: int
    compression: str
    message_max_bytes: int
    metadata_max_age: float
    security_protocol: str
    sasl_mechanism: str
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)

    @classmethod
    def from_context(cls, context: SinkContext) -> KafkaConfig:
        """The sink's config; a SASL protocol needs a user and a password, and they need one."""
        s = context.own_settings(KafkaSettings)
        sasl = s.security_protocol.startswith("SASL_")
        password = s.sasl_password.get_secret_value() if s.sasl_password is not None else None
        if sasl and (s.sasl_username is None or password is None):
            missing = "sasl_username" if s.sasl_username is None else "sasl_password"
            raise SettingsError(
                s.env_name(missing), f"is required with security_protocol {s.security_protocol}"
            )
        if not sasl and (s.sasl_username is not None or password is not None):
            raise SettingsError(
                s.env_name("security_protocol"),
                "must be SASL_PLAINTEXT or SASL_SSL when SASL credentials are set",
            )
        return cls(
            **s.model_dump(exclude={"bootstrap_servers", "sasl_password"}),
            bootstrap_servers=",".join(part.strip() for part in s.bootstrap_servers.split(",")),
            sasl_password=password,
        )

    def producer_config(self) -> dict[str, Any]:
        """librdkafka's configuration of the idempotent producer (holds the password: never log it)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": "outbox-relay",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": self.linger_ms,
            "message.timeout.ms": int(self.timeout * 1000),
            "compression.type": self.compression,
            "message.max.bytes": self.message_max_bytes,
            # keyed records land where Java producers (and Kafka Streams) put the same key
            "partitioner": "murmur2_random",
            # a metadata request must never create a topic (brokers with auto.create.topics.enable)
            "allow.auto.create.topics": False,
            # a broker back after an outage is found within a second
            "reconnect.backoff.max.ms": 1000,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_username is not None and self.sasl_password is not None:
            conf |= {
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.username": self.sasl_username,
                "sasl.password": self.sasl_password,
            }
        return conf

    def redact(self, text: str) -> str:
        """``text`` without the SASL password (nor any URL's password)."""
        text = scrub(text)
        return text.replace(self.sasl_password, "***") if self.sasl_password else text


def topic_for(prefix: str, kind: str) -> str:
    """The topic of an event of ``kind``; a kind that cannot make one is a :class:`PermanentError`."""
    topic = prefix + kind
    if not _TOPIC_RE.match(topic) or topic in ("", ".", ".."):
        raise PermanentError(
            f"kind {kind!r} does not make a Kafka topic (only a-z A-Z 0-9 . _ - are allowed)"
        )
    if len(topic) > MAX_TOPIC_LENGTH:
        raise PermanentError(
            f"kind {kind[:40]!r}… makes a Kafka topic of {len(topic)} characters (at most {MAX_TOPIC_LENGTH})"
        )
    return topic


def record_key(event: OutboxEvent) -> bytes:
    """The record's key: the row's ordering key, or its correlation id when it has none.

    The ordering key column arrives with a later schema; until then every row is keyed by its
    correlation id.
    """
    return event.correlation_id.encode()


Headers = list[tuple[str, str | bytes | None]]


def record_headers(event: OutboxEvent, delivery_id: str) -> Headers:
    """``id`` (what consumers deduplicate on), ``kind``, ``correlation_id`` and ``outcome``."""
    headers: Headers = [
        ("id", delivery_id.encode()),
        ("kind", event.kind.encode()),
        ("correlation_id", event.correlation_id.encode()),
    ]
    if event.outcome is not None:
        headers.append(("outcome", event.outcome.encode()))
    return headers


class _ClientLog:
    """librdkafka's own log lines and errors, into ours: a step quieter (the sink reports what fails
    in ``last_error``), and the same line at most once every ``every`` seconds (an absent broker
    logs each reconnect)."""

    def __init__(self, config: KafkaConfig, every: float = 30.0) -> None:
        self._config = config
        self._every = every
        self._last: dict[str, float] = {}
        self._log = logging.getLogger(f"{__name__}.client")

    def log(self, level: int, msg: str, *args: object) -> None:
        """What librdkafka calls (as ``logging.Logger.log``)."""
        self.emit(max(level - 10, logging.DEBUG), msg % args if args else msg)

    def emit(self, level: int, text: str) -> None:
        """Log ``text`` (redacted) unless the same line was logged within ``every`` seconds."""
        text = self._config.redact(text)
        now = time.monotonic()
        key = re.sub(r"\d+", "#", text)
        if now - self._last.get(key, -self._every) < self._every:
            return
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        self._log.log(level, "kafka client: %s", text)


class _Handle:
    """One ``confluent_kafka.Producer`` and the thread that polls it for delivery reports."""

    def __init__(self, config: KafkaConfig) -> None:
        from confluent_kafka import Producer

        #: why the producer failed for good (then the sink creates another), if it did
        self.fatal: str | None = None
        self._config = config
        self._log = _ClientLog(config)
        self.producer: Producer = Producer(
            {**config.producer_config(), "error_cb": self._on_error, "logger": self._log}
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="outbox_relay.kafka.poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        """Serve delivery reports (and logs, errors) until closed; a fatal error surfaces here too."""
        from confluent_kafka import KafkaException

        while not self._stop.is_set():
            try:
                self.producer.poll(0.1)
            except KafkaException as exc:
                if exc.args and hasattr(exc.args[0], "fatal"):
                    self._on_error(exc.args[0])
                self._stop.wait(0.1)

    def _on_error(self, err: KafkaError) -> None:
        """Client-wide errors (on the poll thread): a fatal one retires this producer."""
        text = f"{err.name()}: {err.str()}"
        if err.fatal() or err.code() == _fatal_code():
            if self.fatal is None:
                self.fatal = self._config.redact(text)
                logger.error(
                    "kafka producer failed for good; the next delivery creates another",
                    extra={"error": self.fatal},
                )
        else:
            self._log.emit(logging.DEBUG, text)

    def close(self, timeout: float) -> None:
        """Stop polling, wait up to ``timeout`` s for the records in flight, drop the rest (blocking)."""
        self._stop.set()
        self._thread.join()
        if self.producer.flush(timeout) > 0:
            self.producer.purge()
            self.producer.flush(0)  # the purged records' reports: their deliveries fail, transient
        self.producer.close()


def _settle(future: asyncio.Future[KafkaError | None], err: KafkaError | None) -> None:
    if not future.done():  # a delivery cancelled meanwhile waits no more
        future.set_result(err)


def _on_delivery(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[KafkaError | None],
    err: KafkaError | None,
    _: Message,
) -> None:
    """The record's delivery report (on the poll thread), handed to the event loop."""
    with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits for this report
        loop.call_soon_threadsafe(_settle, future, err)


class KafkaSink:
    """The idempotent producer of one worker process."""

    name = NAME

    def __init__(self, config: KafkaConfig) -> None:
        import confluent_kafka  # noqa: F401  (fail at the edge when the extra is missing)

        self.config = config
        self._handle: _Handle | None = None
        self._retiring: set[asyncio.Future[None]] = set()
        #: topic -> until when it is known to exist (monotonic seconds)
        self._known: dict[str, float] = {}
        #: topic -> when it was last found missing
        self._missing: dict[str, float] = {}
        #: topic -> the metadata request under way for it
        self._lookups: dict[str, asyncio.Future[bool]] = {}

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Nothing to open up front (the producer is created on first use); close it on exit."""
        try:
            yield
        finally:
            handle, self._handle = self._handle, None
            if handle is not None:
                await asyncio.to_thread(handle.close, CLOSE_TIMEOUT)
            if self._retiring:
                await asyncio.gather(*self._retiring, return_exceptions=True)

    def _current(self) -> _Handle:
        """The producer, created (again, after a fatal error) without waiting."""
        handle = self._handle
        if handle is not None and handle.fatal is None:
            return handle
        if handle is not None:
            retired = asyncio.get_running_loop().run_in_executor(None, handle.close, 0.0)
            self._retiring.add(retired)
            retired.add_done_callback(self._retiring.discard)
        self._handle = handle = _Handle(self.config)
        logger.info("kafka producer created", extra={"bootstrap_servers": self.config.bootstrap_servers})
        return handle

    async def deliver(self, event: OutboxEvent, body: bytes, delivery_id: str) -> None:
        """Produce the record and return once the broker's delivery report says it is written."""
        topic = topic_for(self.config.topic_prefix, event.kind)
        handle = self._current()
        if self._known.get(topic, 0.0) <= time.monotonic():  # known topics go on without a pause
            await self._check_topic(handle, topic)
        loop = asyncio.get_running_loop()
        report: asyncio.Future[KafkaError | None] = loop.create_future()
        on_delivery = functools.partial(_on_delivery, loop, report)
        await self._produce(
            handle, topic, record_key(event), body, record_headers(event, delivery_id), on_delivery
        )
        try:
            err = await asyncio.wait_for(report, self.config.timeout + REPORT_GRACE)
        except TimeoutError:
            raise TransientError(
                f"kafka: no delivery report for topic {topic!r} within {self.config.timeout:g} s"
            ) from None
        if err is not None:
            raise self._failure(handle, err, topic)

    async def _produce(
        self,
        handle: _Handle,
        topic: str,
        key: bytes,
        body: bytes,
        headers: Headers,
        on_delivery: Any,
    ) -> None:
        """Hand the record to the producer; while its queue is full, wait for the poll loop to drain it."""
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + self.config.timeout
        while True:
            try:
                handle.producer.produce(topic, value=body, key=key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:
                if time.monotonic() >= deadline:
                    raise TransientError(
                        f"kafka: the producer's queue stayed full for {self.config.timeout:g} s"
                    ) from None
                await asyncio.sleep(_QUEUE_FULL_PAUSE)
            except KafkaException as exc:
                raise self._failure(handle, exc.args[0], topic) from None

    def _failure(self, handle: _Handle, err: KafkaError, topic: str) -> OutboxRelayError:
        """What a failed delivery means for the row: permanent where retrying cannot help."""
        from confluent_kafka import KafkaError

        reason = self.config.redact(f"{err.name()}: {err.str()}")
        code = err.code()
        if code in (
            KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError._UNKNOWN_TOPIC,
            KafkaError._UNKNOWN_PARTITION,
        ):
            # the cluster's metadata decides: the retry asks it again
            self._known.pop(topic, None)
            return TransientError(
                f"kafka: topic {topic!r} reported unknown ({reason}); checking its metadata"
            )
        if err.fatal() or code in _producer_state_codes() or handle.fatal is not None:
            handle.fatal = handle.fatal or reason
            return TransientError(f"kafka producer failed for good ({reason}); the retry uses a new one")
        if code in _permanent_codes() or (code > 0 and not err.retriable()):
            return PermanentError(f"kafka refused the record for topic {topic!r}: {reason}")
        if code == KafkaError._MSG_TIMED_OUT:
            return TransientError(
                f"kafka: record for topic {topic!r} not acknowledged within {self.config.timeout:g} s"
                " (broker unreachable or slow)"
            )
        return TransientError(f"kafka delivery to topic {topic!r} failed: {reason}")

    async def _check_topic(self, handle: _Handle, topic: str) -> None:
        """Raise :class:`PermanentError` unless the cluster's metadata holds ``topic``: one request at
        a time per topic, its answer shared by every delivery waiting for it."""
        if time.monotonic() - self._missing.get(topic, -MISSING_RECHECK) >= MISSING_RECHECK:
            lookup = self._lookups.get(topic)
            if lookup is None:
                lookup = asyncio.ensure_future(self._topic_exists(handle, topic))
                self._lookups[topic] = lookup
                lookup.add_done_callback(functools.partial(self._looked_up, topic))
            if await asyncio.shield(lookup):
                self._missing.pop(topic, None)
                self._known[topic] = time.monotonic() + self.config.metadata_max_age
                return
            self._missing[topic] = time.monotonic()
        raise PermanentError(
            f"kafka topic {topic!r} does not exist (create it: the relay never creates topics)"
        )

    def _looked_up(self, topic: str, lookup: asyncio.Future[bool]) -> None:
        self._lookups.pop(topic, None)
        if not lookup.cancelled():
            lookup.exception()  # retrieved: a lookup whose waiters all went away logs nothing

    async def _topic_exists(self, handle: _Handle, topic: str) -> bool:
        from confluent_kafka import KafkaError, KafkaException

        try:
            metadata = await asyncio.to_thread(handle.producer.list_topics, topic, self.config.timeout)
        except KafkaException as exc:
            reason = self.config.redact(str(exc.args[0].str() if exc.args else exc))
            raise TransientError(f"kafka: no broker answers for topic {topic!r}: {reason}") from None
        found = metadata.topics.get(topic)
        if found is None or found.error is None:
            return found is not None
        if found.error.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
            return False
        reason = self.config.redact(f"{found.error.name()}: {found.error.str()}")
        if found.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            raise PermanentError(f"kafka refused the metadata of topic {topic!r}: {reason}")
        raise TransientError(f"kafka: the metadata of topic {topic!r} is not available: {reason}")

    async def diagnose(self, kinds: Sequence[str]) -> list[Check]:
        """Checks for `doctor`: ``kafka`` (a broker answers: how many, the cluster id) and ``kafka
        topics`` (the topics of ``kinds`` exist)."""
        from confluent_kafka import KafkaException, Producer

        producer = Producer({**self.config.producer_config(), "logger": _ClientLog(self.config)})
        try:
            metadata = await asyncio.to_thread(producer.list_topics, None, self.config.timeout)
        except KafkaException as exc:
            reason = self.config.redact(str(exc.args[0].str() if exc.args else exc))
            return [
                Check(
                    "kafka",
                    "fail",
                    f"no broker answers at {self.config.bootstrap_servers}: {reason}",
                    fix="start the brokers or set OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS",
                )
            ]
        finally:
            await asyncio.to_thread(producer.close)
        brokers = len(metadata.brokers)
        server = Check("kafka", "ok", f"{brokers} broker(s) answer, cluster {metadata.cluster_id}")
        return [server, _topics_check(self.config.topic_prefix, kinds, metadata.topics)]


def _topics_check(prefix: str, kinds: Sequence[str], topics: dict[str, Any]) -> Check:
    """Whether every kind's topic is in the cluster's metadata ``topics``."""
    if not kinds:
        return Check("kafka topics", "ok", "no routed kind has rows yet")
    wanted, invalid = set(), []
    for kind in kinds:
        try:
            wanted.add(topic_for(prefix, kind))
        except PermanentError as exc:
            invalid.append(str(exc))
    missing = sorted(t for t in wanted if t not in topics or topics[t].error is not None)
    if invalid:
        return Check(
            "kafka topics", "fail", "; ".join(invalid), fix="route only kinds that make Kafka topics"
        )
    if missing:
        return Check(
            "kafka topics",
            "fail",
            f"{len(missing)} of {len(wanted)} topic(s) missing: {', '.join(missing)}",
            fix=f"create them (the relay never creates one): kafka-topics.sh --create --topic {missing[0]}",
        )
    return Check("kafka topics", "ok", f"{len(wanted)} topic(s) exist: {', '.join(sorted(wanted))}")


def _fatal_code() -> int:
    from confluent_kafka import KafkaError

    return int(KafkaError._FATAL)


@functools.cache
def _producer_state_codes() -> frozenset[int]:
    """Errors of the idempotent producer's state, not of the record (a broker that lost it, e.g. one
    restarted empty): a new producer mends them."""
    from confluent_kafka import KafkaError

    return frozenset(
        {
            KafkaError._FATAL,
            KafkaError.UNKNOWN_PRODUCER_ID,
            KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
            KafkaError.INVALID_PRODUCER_EPOCH,
        }
    )


@functools.cache
def _permanent_codes() -> frozenset[int]:
    """Errors of a record that no retry can mend."""
    from confluent_kafka import KafkaError

    return frozenset(
        {
            KafkaError.MSG_SIZE_TOO_LARGE,
            KafkaError.RECORD_LIST_TOO_LARGE,
            KafkaError.INVALID_RECORD,
            KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.TOPIC_EXCEPTION,
            KafkaError.POLICY_VIOLATION,
            KafkaError._INVALID_ARG,
        }
    )


def _make(context: SinkContext) -> KafkaSink:
    return KafkaSink(KafkaConfig.from_context(context))


plugin = SinkPlugin(NAME, handlers={}, settings=KafkaSettings, make=_make)
