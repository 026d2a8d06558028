"""Kafka adapter (kafka-python): acks=all, idempotent producer, bounded retries.

The only module that imports kafka. Errors leave here as BusError with a one-line
message that names the bootstrap servers but never credentials.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)
from pydantic import SecretStr

from chainwatch.bus.base import Bus, Consumer, Message
from chainwatch.exceptions import BusError

log = logging.getLogger(__name__)

# How old a client's topic metadata may get (kafka-python's default is 5 min). A new
# partition is assigned only once the member that makes the group's assignments has seen
# it in its metadata, and a producer sends keyed records to it only once it has seen it;
# the same age for both keeps a node's records moving to their new partition close to
# the detectors' rebalance. A request this often is nothing to the broker.
METADATA_MAX_AGE_MS = 30_000


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    client_id: str = "chainwatch"
    partitions: int = 6
    replication_factor: int = 1
    session_timeout_ms: int = 10_000
    bootstrap_timeout_ms: int = 10_000
    extra: dict[str, Any] = field(default_factory=dict)

    def common(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
            "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
        }
        if self.sasl_mechanism:
            conf["sasl_mechanism"] = self.sasl_mechanism
            conf["sasl_plain_username"] = self.sasl_username
            conf["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.ssl_cafile:
            conf["ssl_cafile"] = self.ssl_cafile
        return conf


def _no_session(config: KafkaConfig) -> BusError:
    """The error for a bootstrap that timed out: unreachable, or reachable but refused.

    kafka-python retries a failed TLS or SASL handshake until ``bootstrap_timeout_ms`` and
    then raises a bare timeout; "cannot reach" would send the operator after the network
    when the password is wrong. A TCP connect tells the two apart (no credentials named).
    """
    servers = config.bootstrap_servers
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or server, int(port)), timeout=2):
                pass
        except (OSError, ValueError):
            continue
        if config.security_protocol == "PLAINTEXT":
            return BusError(
                f"Kafka at {servers} accepts connections but gave no metadata (a TLS or "
                "SASL listener? see CHAINWATCH_KAFKA_SECURITY_PROTOCOL)"
            )
        what = {"SSL": "TLS", "SASL_PLAINTEXT": "SASL", "SASL_SSL": "TLS or SASL"}.get(
            config.security_protocol, config.security_protocol
        )
        return BusError(
            f"Kafka at {servers} refused the session ({what} handshake failed): check the "
            "CHAINWATCH_KAFKA_SECURITY_PROTOCOL, _SASL_MECHANISM, _SASL_USERNAME, "
            "_SASL_PASSWORD and _SSL_CAFILE settings"
        )
    return BusError(f"cannot reach Kafka at {servers}")


def _discard(producer: KafkaProducer) -> None:
    """Close a producer without waiting for its stuck batches.

    KafkaProducer.close() flushes first and raises on a stuck batch before it gets to
    force-closing, which would leave its I/O thread and connection behind: stop the I/O
    thread first (that fails the stuck batches), then close.
    """
    sender = getattr(producer, "_sender", None)
    with contextlib.suppress(Exception):
        if sender is not None:
            sender.force_close()
            sender.join(5)
        producer.close(timeout=0)


def _describe(exc: BaseException) -> str:
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"


class _LogAssignments(ConsumerRebalanceListener):
    """Logs each change of the partitions this member holds: an operator scaling the
    detector group sees the rebalance, and a member left with none says so."""

    def __init__(self, group: str) -> None:
        self.group = group

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            log.info("partitions revoked", extra={"group": self.group,
                                                 "partitions": len(revoked)})

    def on_partitions_assigned(self, assigned: Any) -> None:
        topics = sorted({tp.topic for tp in assigned})
        log.info("partitions assigned", extra={"group": self.group,
                                              "partitions": len(assigned), "topics": topics})


class _KafkaConsumer(Consumer):
    """A group member, kept from sitting on an empty assignment.

    With kafka-python 3.0.12 a new member's first JoinGroup often runs before its
    metadata holds the subscribed topics, so the first assignment is empty; a metadata
    update normally follows and makes it rejoin. About one start in 30 of our integration
    tests that rejoin never came, and the detector held no partitions until the next
    scheduled metadata refresh (`metadata_max_age_ms`, 5 min). While this member holds
    no partitions it refreshes the metadata every `recheck_empty_s`; kafka-python rejoins
    by itself when the partitions it sees differ from those it assigned. A member that
    holds none because the group has more members than partitions only pays a metadata
    request now and then.
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        *,
        recheck_empty_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._recheck_empty_s = recheck_empty_s
        self._clock = clock
        self._empty_since: float | None = None

    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Message]:
        try:
            batches = self._consumer.poll(
                timeout_ms=int(timeout * 1000), max_records=max_records
            )
            if not batches:
                self._recheck_if_empty()
        except KafkaError as exc:
            raise BusError(f"Kafka poll failed: {_describe(exc)}") from None
        out: list[Message] = []
        for tp, records in batches.items():
            for r in records:
                key = r.key.decode("utf-8", "replace") if r.key is not None else None
                out.append(Message(tp.topic, key, r.value or b"", tp.partition, r.offset))
        return out

    def _recheck_if_empty(self) -> None:
        if self._consumer.assignment():
            self._empty_since = None
            return
        now = self._clock()
        if self._empty_since is None:
            self._empty_since = now
        elif now - self._empty_since >= self._recheck_empty_s:
            self._empty_since = now
            log.debug("no partitions assigned; refreshing the topic metadata")
            self._consumer.topics()  # a full refresh; kafka-python rejoins if it differs

    def commit(self) -> None:
        """Commit what was polled; a commit the group refused after a rebalance is dropped.

        After the broker was away the group has usually moved on (the member was evicted, a
        rebalance is pending). That commit can never succeed, and kafka-python rejoins only
        inside `poll`: raising would keep the detector retrying the commit and never polling,
        stuck for good. Dropping it is at-least-once: after the rejoin the records from the
        last committed offset come again and the detector drops them by event_id.
        """
        try:
            self._consumer.commit()
        except (CommitFailedError, RebalanceInProgressError) as exc:
            log.warning(
                "offset commit refused by the group (rebalanced); rejoining, the records "
                "since the last commit will be delivered again",
                extra={"error": _describe(exc)},
            )
        except KafkaError as exc:
            raise BusError(f"Kafka commit failed: {_describe(exc)}") from None

    def lag(self) -> int | None:
        try:
            assigned = self._consumer.assignment()
            if not assigned:
                return 0
            ends = self._consumer.end_offsets(list(assigned))
            return sum(max(ends[tp] - self._consumer.position(tp), 0) for tp in assigned)
        except (KafkaError, AssertionError, KeyError):
            return None

    def close(self) -> None:
        self._consumer.close()


class KafkaBus(Bus):
    name = "kafka"

    def __init__(self, config: KafkaConfig, *, max_retries: int = 10) -> None:
        self.config = config
        self.max_retries = max_retries
        self._producer: KafkaProducer | None = None
        self._producer_lock = threading.Lock()
        # In `run --kafka` the collector and the detector share this bus from two threads:
        # each thread waits for the acknowledgements of its own messages only.
        self._local = threading.local()

    @property
    def _pending(self) -> list[tuple[KafkaProducer, Any]]:
        """This thread's (producer, future) pairs not yet confirmed by a flush."""
        if not hasattr(self._local, "pending"):
            self._local.pending = []
        return self._local.pending

    @_pending.setter
    def _pending(self, value: list[tuple[KafkaProducer, Any]]) -> None:
        self._local.pending = value

    def _producer_or_connect(self) -> KafkaProducer:
        with self._producer_lock:
            return self._connect_producer()

    def _connect_producer(self) -> KafkaProducer:
        if self._producer is None:
            try:
                self._producer = KafkaProducer(
                    **self.config.common(),
                    acks="all",
                    enable_idempotence=True,
                    retries=self.max_retries,
                    retry_backoff_ms=200,
                    delivery_timeout_ms=60_000,
                    request_timeout_ms=15_000,
                    max_block_ms=30_000,
                    linger_ms=5,
                    batch_size=256 * 1024,
                    max_request_size=8 * 1024 * 1024,
                    # keyed records follow partitions added to a topic within 30 s
                    metadata_max_age_ms=METADATA_MAX_AGE_MS,
                )
            except KafkaTimeoutError:
                raise _no_session(self.config) from None
            except KafkaError as exc:
                raise BusError(f"Kafka producer failed to start: {_describe(exc)}") from None
        return self._producer

    def check(self) -> None:
        """Fail fast with one line when the brokers cannot be reached."""
        self.ensure_topics([])

    def ensure_topics(self, topics: list[str]) -> None:
        try:
            admin = KafkaAdminClient(**self.config.common(), request_timeout_ms=10_000)
        except KafkaTimeoutError:
            raise _no_session(self.config) from None
        except KafkaError as exc:
            raise BusError(f"Kafka admin failed: {_describe(exc)}") from None
        try:
            existing = set(admin.list_topics())
            missing = {
                t: {
                    "num_partitions": self.config.partitions,
                    "replication_factor": self.config.replication_factor,
                }
                for t in topics
                if t not in existing
            }
            if missing:
                try:
                    admin.create_topics(missing, wait_for_metadata=True)
                    log.info("created topics", extra={"topics": sorted(missing)})
                except TopicAlreadyExistsError:
                    pass
        except KafkaError as exc:
            raise BusError(f"Kafka topic setup failed: {_describe(exc)}") from None
        finally:
            admin.close()

    def publish(self, topic: str, key: str | None, value: bytes) -> None:
        producer = self._producer_or_connect()
        try:
            future = producer.send(
                topic, key=key.encode() if key is not None else None, value=value
            )
        except KafkaError as exc:  # e.g. no room in a buffer nothing drains (see flush)
            self._pending = []  # the caller publishes the whole batch again
            self._replace(producer)
            raise BusError(f"Kafka publish failed: {_describe(exc)}") from None
        self._pending.append((producer, future))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for this thread's messages; on any failure the producer is replaced.

        The caller publishes everything again after a BusError (at-least-once), so the
        messages of a replaced producer are not needed. Replacing is what gets the bus
        back after a long broker outage: kafka-python 3.0.12 wedges an idempotent
        producer for good once a batch it had sent expires (delivery_timeout_ms) or is
        rejected. It clears the producer id without going back to the state that asks
        the broker for a new one, so every later batch waits forever (Java's client
        returns to UNINITIALIZED there). A new producer gets a new id.
        """
        pending, self._pending = self._pending, []
        producer = self._producer
        if producer is not None:
            try:
                producer.flush(timeout=timeout)
            except KafkaError as exc:
                self._replace(producer)
                raise BusError(f"Kafka flush failed: {_describe(exc)}") from None
        for owner, future in pending:
            if not future.is_done:
                self._replace(owner)
                raise BusError("Kafka did not acknowledge all messages in time")
            if future.failed():
                self._replace(owner)
                raise BusError(f"Kafka rejected a message: {_describe(future.exception)}")

    def _replace(self, producer: KafkaProducer) -> None:
        """Forget `producer` (if still current); the next publish connects a new one."""
        with self._producer_lock:
            if self._producer is not producer:
                return  # already replaced (another thread's failure, or an old producer)
            self._producer = None
        log.warning("Kafka producer replaced after a failed flush; unacknowledged messages "
                    "will be published again")
        _discard(producer)

    def consumer(self, topics: list[str], group: str) -> Consumer:
        try:
            consumer = KafkaConsumer(
                **self.config.common(),
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=self.config.session_timeout_ms,
                heartbeat_interval_ms=max(self.config.session_timeout_ms // 4, 500),
                max_poll_interval_ms=300_000,
                fetch_max_bytes=32 * 1024 * 1024,
                max_partition_fetch_bytes=8 * 1024 * 1024,
                # the group leader sees partitions added to the topics at its next metadata
                # refresh and then rebalances: within 30 s, not kafka-python's 5 min
                metadata_max_age_ms=METADATA_MAX_AGE_MS,
            )
            consumer.subscribe(topics, listener=_LogAssignments(group))
            # The topics' partitions in the metadata before the first JoinGroup, so that
            # the first assignment is not empty (see _KafkaConsumer).
            consumer.topics()
        except KafkaTimeoutError:
            raise _no_session(self.config) from None
        except KafkaError as exc:
            raise BusError(f"Kafka consumer failed to start: {_describe(exc)}") from None
        return _KafkaConsumer(consumer)

    def close(self) -> None:
        """Flush for up to 10 s, then close; a broker that is away does not stop a shutdown."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.flush(timeout=10)
        except KafkaError as exc:
            log.warning("Kafka did not acknowledge everything before shutdown",
                        extra={"error": _describe(exc)})
        _discard(producer)
