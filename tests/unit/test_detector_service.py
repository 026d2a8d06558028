"""The detector service over the embedded bus: decode, process, publish, dead-letter."""

import base64
import json
import threading
import time

from chainwatch.bus import EmbeddedBus, Topics
from chainwatch.httpserver import Health
from chainwatch.metrics import Metrics
from chainwatch.schema import Finding, Reorg, decode, encode
from detector.engine import Detector, DetectorConfig
from detector.service import DetectorService
from tests.fakes import make_block

TOPICS = Topics("test")


class Rig:
    """Bus, service and two watchers (findings, dead letters) subscribed before publishing."""

    def __init__(self) -> None:
        self.bus = EmbeddedBus()
        self.metrics = Metrics()
        # the test chain's blocks are a few seconds old on this clock: nobody is stalled
        self.detector = Detector(DetectorConfig(), self.metrics, clock=lambda: 1_700_000_060.0)
        self.service = DetectorService(
            self.bus, TOPICS, self.detector, Health(time.time), poll_timeout=0.05
        )
        self.consumer = self.service.subscribe()
        self.dead = self.bus.consumer([TOPICS.deadletter], "watch-deadletter")
        self.findings = self.bus.consumer([TOPICS.findings], "watch-findings")
        self.blocks = chain(5)

    def publish_blocks(self, blocks=None) -> None:
        for b in self.blocks if blocks is None else blocks:
            self.bus.publish(TOPICS.blocks, b.stream_key(), encode(b))

    def step(self) -> list[Finding]:
        found = self.service.handle(self.consumer.poll(0.1))
        self.service._deliver(self.consumer)
        return found

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def chain(n: int):
    blocks, parent = [], "0x" + "00" * 32
    for number in range(n):
        blocks.append(make_block(number, parent, node="a"))
        parent = blocks[-1].hash
    return blocks


def reorg_of(blocks, depth: int) -> Reorg:
    old, ancestor = blocks[-1], blocks[-1 - depth]
    new_hash = "0x" + "ee" * 32
    return Reorg(
        chain_id=1, node="a", event_id=Reorg.id_for(1, "a", old.hash, new_hash),
        observed_at=old.observed_at + 1, old_head_number=old.number, old_head_hash=old.hash,
        new_head_number=old.number, new_head_hash=new_hash,
        common_ancestor_number=ancestor.number, common_ancestor_hash=ancestor.hash, depth=depth,
    )


def test_poison_message_goes_to_dead_letter_and_valid_blocks_are_processed():
    rig = Rig()
    rig.publish_blocks(rig.blocks[:2])
    rig.bus.publish(TOPICS.blocks, "1:a", b"garbage")
    rig.publish_blocks(rig.blocks[2:])
    rig.step()

    assert rig.value("chainwatch_invalid_records_total", topic=TOPICS.blocks) == 1
    assert rig.value("chainwatch_blocks_observed_total", chain_id="1", node="a") == 5
    assert rig.value("chainwatch_head_block_number", chain_id="1", node="a") == 4

    dead = rig.dead.poll(0.1)
    assert len(dead) == 1
    assert dead[0].key == "1:a"
    envelope = json.loads(dead[0].value)
    assert base64.b64decode(envelope["payload_base64"]) == b"garbage"
    assert envelope["source_topic"] == TOPICS.blocks
    assert envelope["offset"] == 2
    assert envelope["error"].startswith("invalid record")
    assert "\n" not in envelope["error"]
    assert rig.findings.poll(0) == []


def test_dead_letters_are_published_only_on_deliver():
    rig = Rig()
    rig.bus.publish(TOPICS.blocks, None, b"\xff\xfe not utf-8")
    rig.service.handle(rig.consumer.poll(0.1))
    assert rig.dead.poll(0) == []  # queued, not yet published
    rig.service._deliver(rig.consumer)
    (dead,) = rig.dead.poll(0.1)
    assert base64.b64decode(json.loads(dead.value)["payload_base64"]) == b"\xff\xfe not utf-8"


def test_reorg_produces_a_finding_message_that_decodes():
    rig = Rig()
    rig.publish_blocks()
    r = reorg_of(rig.blocks, depth=2)
    rig.bus.publish(TOPICS.blocks, r.stream_key(), encode(r))
    returned = rig.step()

    messages = rig.findings.poll(0.1)
    assert len(messages) == 1
    finding = decode(messages[0].value)
    assert isinstance(finding, Finding)
    assert finding == returned[0]
    assert (finding.detector, finding.severity, finding.block_number) == (
        "reorg_depth", "warning", 4,
    )
    assert messages[0].key == "1:a"
    assert rig.value("chainwatch_reorgs_total", chain_id="1", node="a") == 1
    assert rig.dead.poll(0) == []


def test_redelivered_batch_publishes_no_second_finding():
    rig = Rig()
    rig.publish_blocks()
    r = reorg_of(rig.blocks, depth=1)
    for _ in range(2):  # at-least-once: the same reorg arrives twice
        rig.bus.publish(TOPICS.blocks, r.stream_key(), encode(r))
    rig.step()
    assert len(rig.findings.poll(0.1)) == 1
    assert rig.value("chainwatch_duplicate_events_total", type="reorg") == 1


def test_findings_reach_sinks():
    rig = Rig()
    seen: list[Finding] = []
    rig.service.sinks.append(seen.append)
    rig.publish_blocks()
    r = reorg_of(rig.blocks, depth=3)
    rig.bus.publish(TOPICS.blocks, r.stream_key(), encode(r))
    rig.step()
    assert [f.detector for f in seen] == ["reorg_depth"]


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_run_loop_survives_poison_messages_and_keeps_processing():
    rig = Rig()
    rig.blocks = chain(8)
    stop = threading.Event()
    thread = threading.Thread(target=rig.service.run, args=(stop,), daemon=True)
    thread.start()
    try:
        rig.bus.publish(TOPICS.blocks, None, b"garbage")
        rig.bus.publish(TOPICS.blocks, None, b"[1, 2, 3]")
        rig.publish_blocks()
        r = reorg_of(rig.blocks, depth=6)
        rig.bus.publish(TOPICS.blocks, r.stream_key(), encode(r))
        assert _wait_for(
            lambda: rig.value("chainwatch_reorgs_total", chain_id="1", node="a") == 1
        )
        assert thread.is_alive()
        assert rig.value("chainwatch_invalid_records_total", topic=TOPICS.blocks) == 2
        assert rig.value("chainwatch_blocks_observed_total", chain_id="1", node="a") == 8
        assert rig.service.health.ready() == (True, "ok")
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    dead = [json.loads(m.value) for m in rig.dead.poll(0.1)]
    assert [base64.b64decode(e["payload_base64"]) for e in dead] == [b"garbage", b"[1, 2, 3]"]
    (message,) = rig.findings.poll(0.1)
    finding = decode(message.value)
    assert isinstance(finding, Finding) and finding.severity == "critical"
