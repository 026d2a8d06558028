"""Partitions added to the topics on the real broker, through the bus's own consumer and
producer (`chainwatch.bus.kafka`, their settings as shipped): detector replicas in one
consumer group take them up without a restart, and keyed records move to them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewPartitions
from kafka.coordinator.base import MemberState
from kafka.partitioner.default import murmur2

from chainwatch.bus.base import Consumer, Message
from chainwatch.bus.kafka import KafkaBus, KafkaConfig
from chainwatch.local.kafka import KafkaBroker

pytestmark = pytest.mark.integration


def _poll_until(
    members: list[Consumer], done: Callable[[list[Message]], bool], timeout: float
) -> list[Message]:
    """Poll every member in turn (as each replica's loop would) until `done(read so far)`
    or `timeout` seconds; what they read."""
    read: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(read):
        for member in members:
            read.extend(member.poll(0.2))
    return read


def _owned(member: Consumer) -> set[int]:
    return {tp.partition for tp in member._consumer.assignment()}  # type: ignore[attr-defined]


def _generation(member: Consumer) -> int | None:
    """The group generation this member has joined and synced, None while (re)joining."""
    meta = member._consumer.group_metadata()  # type: ignore[attr-defined]
    return meta.generation_id if meta.state is MemberState.STABLE else None


def _settled(members: list[Consumer]) -> bool:
    """Every member joined the same generation: no rebalance under way."""
    generations = {_generation(m) for m in members}
    return len(generations) == 1 and None not in generations


@pytest.mark.parametrize(("idle", "within_s"), [
    # the idle replica made the assignment: its own 10 s recheck while it holds nothing
    ("leader", 30.0),
    # the replica that made it holds partition 0: its metadata refresh (30 s, not 5 min)
    ("member", 45.0),
])
def test_a_partition_added_later_is_taken_up_by_the_idle_replica(
    kafka: KafkaBroker, idle: str, within_s: float
) -> None:
    """Two replicas, a one-partition topic: one holds nothing. An operator then adds a
    partition. kafka-python rebalances only once the member that made the assignment
    (the first to join, the group's leader) sees the partition in its metadata, which it
    refreshes every 5 minutes by default. Checked: with the recheck off the leader case
    read nothing in 30 s, and with a 5 min metadata age the member case nothing in 60 s."""
    topic = f"cw-group-{uuid.uuid4().hex[:8]}"
    group = f"detectors-{topic}"
    KafkaBus(KafkaConfig(bootstrap_servers=kafka.bootstrap, partitions=1)).ensure_topics([topic])

    def replica(client_id: str) -> Consumer:
        bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka.bootstrap, client_id=client_id))
        return bus.consumer([topic], group)

    # the range assignor hands partition 0 to the member id that sorts first
    first, second = ("zz-detector", "aa-detector") if idle == "leader" else (
        "aa-detector", "zz-detector")
    leader = replica(first)
    members = [leader]
    try:
        _poll_until(members, lambda _: bool(_owned(leader)), 30)
        assert _owned(leader) == {0}
        other = replica(second)
        members.append(other)
        busy, idle_one = (other, leader) if idle == "leader" else (leader, other)
        # both joined (a rebalance under way would read the new metadata by itself)
        _poll_until(members, lambda _: _settled(members), 60)
        assert (_owned(busy), _owned(idle_one)) == ({0}, set())

        admin = KafkaAdminClient(bootstrap_servers=[kafka.bootstrap])
        try:
            admin.create_partitions({topic: NewPartitions(total_count=2)})
        finally:
            admin.close()
        producer = KafkaProducer(bootstrap_servers=[kafka.bootstrap])
        try:
            producer.send(topic, b"on the new partition", partition=1).get(timeout=10)
        finally:
            producer.close()

        started = time.monotonic()
        read = _poll_until(members, bool, 60)
        waited = time.monotonic() - started
        assert [(m.partition, m.value) for m in read] == [(1, b"on the new partition")], (
            f"the record on the added partition was not read in {waited:.0f} s")
        assert _owned(busy) | _owned(idle_one) == {0, 1}
        assert waited < within_s
    finally:
        for member in members:
            member.close()


def _partition_of(key: str, partitions: int) -> int:
    """The partition kafka's default partitioner gives a key (murmur2, as Java's)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def test_keyed_records_move_to_partitions_added_later(kafka: KafkaBroker) -> None:
    """Records are keyed by chain and node. Once an operator adds partitions, the bus's
    producer sends a key to its new partition only when its own metadata shows them:
    within 30 s (kafka-python refreshes it every 5 min by default, so a node's records
    would change partition minutes after the detectors rebalanced). Checked: with the
    default age no record reached an added partition in 60 s."""
    topic = f"cw-keys-{uuid.uuid4().hex[:8]}"
    KafkaBus(KafkaConfig(bootstrap_servers=kafka.bootstrap, partitions=1)).ensure_topics([topic])
    keys = [f"1/node-{i}" for i in range(8)]
    moving = {k: _partition_of(k, 4) for k in keys if _partition_of(k, 4) != 0}
    assert moving, "no key would move: pick other keys"
    bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka.bootstrap))
    reader: KafkaConsumer | None = None
    try:
        for key in keys:  # the producer's metadata now shows one partition
            bus.publish(topic, key, b"before")
        bus.flush()
        admin = KafkaAdminClient(bootstrap_servers=[kafka.bootstrap])
        try:
            admin.create_partitions({topic: NewPartitions(total_count=4)})
        finally:
            admin.close()
        added = [TopicPartition(topic, p) for p in (1, 2, 3)]
        reader = KafkaConsumer(bootstrap_servers=[kafka.bootstrap], enable_auto_commit=False)
        started = time.monotonic()
        waited = 0.0
        while waited < 60:
            for key in keys:
                bus.publish(topic, key, b"after")
            bus.flush()
            if sum(reader.end_offsets(added).values()):
                break
            time.sleep(1)
            waited = time.monotonic() - started
        assert waited < 45, f"no keyed record reached an added partition in {waited:.0f} s"

        reader.assign(added)
        reader.seek_to_beginning()
        landed: dict[str, set[int]] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and set(landed) != set(moving):
            for tp, records in reader.poll(timeout_ms=500).items():
                for r in records:
                    landed.setdefault(r.key.decode(), set()).add(tp.partition)
        # each moved key on its own new partition, and no other key on an added one
        assert landed == {k: {p} for k, p in moving.items()}
    finally:
        if reader is not None:
            reader.close()
        bus.close()
