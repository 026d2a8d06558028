"""The Kafka adapter after a broker outage: neither the producer nor the consumer may stay
wedged once the broker is back. Both were found by tests/integration/test_faults_kafka.py:

- kafka-python rejoins a group only inside poll(); a detector that retried a refused
  commit forever without polling never came back;
- kafka-python 3.0.12 leaves an idempotent producer without a producer id for good once
  a sent batch expires; a collector that kept that producer never published again.

And one found by tests/integration/test_spine.py: a new member's first assignment is often
empty (its metadata did not hold the topics yet), and now and then the rejoin that should
follow never came, so the detector held no partitions for minutes.
"""

from __future__ import annotations

import threading
import time
from collections import namedtuple
from typing import Any

import pytest
from kafka.errors import CommitFailedError, KafkaTimeoutError, RebalanceInProgressError

from chainwatch.bus import EmbeddedBus, Topics
from chainwatch.bus.kafka import KafkaBus, KafkaConfig, _KafkaConsumer
from chainwatch.exceptions import BusError
from chainwatch.httpserver import Health
from chainwatch.metrics import Metrics
from chainwatch.schema import encode
from detector.engine import Detector, DetectorConfig
from detector.service import DetectorService
from tests.fakes import make_block

TP = namedtuple("TP", "topic partition")
Rec = namedtuple("Rec", "key value offset")


class GroupConsumer:
    """kafka-python's consumer, scripted: after poll number `evict_after` the group evicts
    the member (the broker was away), and commits fail until the next poll rejoins."""

    def __init__(self, batches: list[list[bytes]], evict_after: int | None = None) -> None:
        self.batches = batches
        self.evict_after = evict_after
        self.evicted = False
        self.polls = self.commits = self.offset = 0

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Rec]]:
        self.polls += 1
        self.evicted = self.polls == self.evict_after
        if not self.batches:
            time.sleep(timeout_ms / 1000)
            return {}
        batch = self.batches.pop(0)
        records = [Rec(b"1:a", v, self.offset + i) for i, v in enumerate(batch)]
        self.offset += len(batch)
        return {TP("test.blocks", 0): records}

    def commit(self) -> None:
        if self.evicted:
            raise CommitFailedError("consumer is not part of an active group")
        self.commits += 1

    def assignment(self) -> set[Any]:
        return set()

    def close(self) -> None:
        pass


def test_a_commit_refused_after_an_eviction_is_dropped_so_the_next_poll_rejoins() -> None:
    first = make_block(0, "0x" + "00" * 32, node="a")
    second = make_block(1, first.hash, node="a")
    raw = GroupConsumer([[encode(first)], [encode(second)]], evict_after=1)
    metrics = Metrics()
    service = DetectorService(EmbeddedBus(), Topics("test"), Detector(DetectorConfig(), metrics),
                              Health(time.time), poll_timeout=0.05)
    service.consumer = _KafkaConsumer(raw)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while raw.commits == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(timeout=40)
    assert raw.offset == 2, "the detector polled again after the refused commit"
    assert raw.commits >= 1, "and committed once back in the group"
    assert metrics.registry.get_sample_value("chainwatch_events_processed_total",
                                             {"type": "block"}) == 2


@pytest.mark.parametrize("error", [CommitFailedError(), RebalanceInProgressError()])
def test_rebalance_errors_do_not_raise(error: Exception) -> None:
    raw = GroupConsumer([])
    raw.commit = lambda: (_ for _ in ()).throw(error)  # type: ignore[method-assign]
    _KafkaConsumer(raw).commit()


def test_an_unreachable_broker_still_fails_the_commit() -> None:
    raw = GroupConsumer([])
    raw.commit = lambda: (_ for _ in ()).throw(KafkaTimeoutError())  # type: ignore[method-assign]
    with pytest.raises(BusError, match="Kafka commit failed"):
        _KafkaConsumer(raw).commit()


class MemberWithoutPartitions:
    """kafka-python's consumer in a group that assigned it nothing; a metadata refresh
    (`topics()`) makes it rejoin and get a partition when `refresh_fixes` is set."""

    def __init__(self, refresh_fixes: bool) -> None:
        self.refresh_fixes = refresh_fixes
        self.refreshes = 0

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Rec]]:
        return {}

    def assignment(self) -> set[Any]:
        return {TP("test.blocks", 0)} if self.refresh_fixes and self.refreshes else set()

    def topics(self) -> set[str]:
        self.refreshes += 1
        return {"test.blocks"}


def polls_at(consumer: _KafkaConsumer, clock: list[float], times: list[float]) -> None:
    for t in times:
        clock[0] = t
        consumer.poll(0.01)


def test_a_member_without_partitions_refreshes_the_metadata_until_it_holds_some() -> None:
    raw, clock = MemberWithoutPartitions(refresh_fixes=True), [0.0]
    consumer = _KafkaConsumer(raw, recheck_empty_s=10, clock=lambda: clock[0])
    polls_at(consumer, clock, [0, 4, 9.9])
    assert raw.refreshes == 0, "a new member gets time to join first"
    polls_at(consumer, clock, [10])
    assert raw.refreshes == 1
    polls_at(consumer, clock, [15, 25, 60])
    assert raw.refreshes == 1, "holding a partition now: no more refreshes"


def test_a_member_the_group_has_no_partition_for_refreshes_only_now_and_then() -> None:
    raw, clock = MemberWithoutPartitions(refresh_fixes=False), [0.0]
    consumer = _KafkaConsumer(raw, recheck_empty_s=10, clock=lambda: clock[0])
    polls_at(consumer, clock, [0.5 * i for i in range(121)])  # 60 s of polling
    assert raw.refreshes == 6


def test_a_new_consumer_reads_the_topic_metadata_after_subscribing_before_any_poll(
    monkeypatch,
) -> None:
    calls: list[str] = []

    class RecordingConsumer:
        def __init__(self, **config: Any) -> None:
            calls.append("create")

        def subscribe(self, topics: list[str], listener: Any = None) -> None:
            calls.append("subscribe")

        def topics(self) -> set[str]:
            calls.append("topics")
            return set()

        def poll(self, **kwargs: Any) -> dict[Any, Any]:
            calls.append("poll")
            return {}

    monkeypatch.setattr("chainwatch.bus.kafka.KafkaConsumer", RecordingConsumer)
    KafkaBus(KafkaConfig("127.0.0.1:9")).consumer(["test.blocks"], "g")
    assert calls == ["create", "subscribe", "topics"]


class FakeFuture:
    def __init__(self, ok: bool | None) -> None:
        self.is_done = ok is not None
        self.exception = None if ok else KafkaTimeoutError("Expiring 1 record(s)")

    def failed(self) -> bool:
        return self.exception is not None and self.is_done


class FakeSender:
    def __init__(self) -> None:
        self.force_closed = False

    def force_close(self) -> None:
        self.force_closed = True

    def join(self, timeout: float) -> None:
        pass


class FakeProducer:
    """First instance: wedged (nothing is ever acknowledged). Later ones: healthy."""

    made: list[FakeProducer] = []

    def __init__(self, **config: Any) -> None:
        self.wedged = not FakeProducer.made
        self._sender = FakeSender()
        self.closed = False
        self.sent: list[bytes] = []
        FakeProducer.made.append(self)

    def send(self, topic: str, key: bytes | None, value: bytes) -> FakeFuture:
        self.sent.append(value)
        return FakeFuture(None if self.wedged else True)

    def flush(self, timeout: float | None = None) -> None:
        if self.wedged:
            raise KafkaTimeoutError("Timeout waiting for future")

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def test_a_failed_flush_replaces_the_producer_so_the_retry_can_succeed(monkeypatch) -> None:
    FakeProducer.made = []
    monkeypatch.setattr("chainwatch.bus.kafka.KafkaProducer", FakeProducer)
    bus = KafkaBus(KafkaConfig("127.0.0.1:1"))
    bus.publish("t", "k", b"block-7")
    with pytest.raises(BusError, match="flush failed"):
        bus.flush()
    wedged = FakeProducer.made[0]
    assert wedged._sender.force_closed and wedged.closed, "its I/O thread is not left behind"

    bus.publish("t", "k", b"block-7")  # the caller publishes again after a BusError
    bus.flush()
    assert [p.sent for p in FakeProducer.made] == [[b"block-7"], [b"block-7"]]


def test_messages_of_a_producer_replaced_by_another_thread_are_not_taken_as_acked(
    monkeypatch,
) -> None:
    FakeProducer.made = []
    monkeypatch.setattr("chainwatch.bus.kafka.KafkaProducer", FakeProducer)
    bus = KafkaBus(KafkaConfig("127.0.0.1:1"))
    bus.publish("t", "k", b"mine")  # on the wedged producer, not acknowledged
    bus_error: list[BaseException] = []

    def other_thread() -> None:
        bus.publish("t", "k", b"theirs")
        try:
            bus.flush()
        except BusError as exc:
            bus_error.append(exc)

    other = threading.Thread(target=other_thread)
    other.start()
    other.join()
    assert bus_error, "the other thread's flush failed and replaced the producer"
    with pytest.raises(BusError, match="did not acknowledge"):
        bus.flush()  # a healthy new producer now, but "mine" went nowhere


def test_closing_while_the_broker_is_away_does_not_raise(monkeypatch) -> None:
    FakeProducer.made = []
    monkeypatch.setattr("chainwatch.bus.kafka.KafkaProducer", FakeProducer)
    bus = KafkaBus(KafkaConfig("127.0.0.1:1"))
    bus.publish("t", "k", b"unacknowledged")
    bus.close()  # SIGTERM during an outage: a log line, not a traceback
    assert FakeProducer.made[0].closed and FakeProducer.made[0]._sender.force_closed
