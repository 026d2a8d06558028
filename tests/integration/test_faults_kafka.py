"""Kafka-side faults on real servers, each ending with an exact account of what the node made.

Every test runs `chainwatch collect` and `chainwatch detect` as processes against a real
broker and anvil with blocks and pending transactions flowing, injects one fault, and
then reads the topics back from offset 0: every block height the node produced must be
on the blocks topic with the node's hash, every pending transaction sent must be on the
mempool topic, inside a delivered block, or counted in
`chainwatch_collector_records_dropped_total`, and the detector must have processed each
distinct record exactly once (copies from at-least-once redelivery counted as duplicates,
never twice). docs/reliability.md has the figures.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chainwatch.local.anvil import Anvil
from chainwatch.local.kafka import KafkaBroker
from chainwatch.schema import AnyRecord, Block, Finding, PendingTx, Reorg, decode
from tests.integration.conftest import free_port, metric, rpc, wait_until
from tests.integration.test_multinode import nodes_file
from tests.integration.test_spine import LABELS, node_args
from tests.servers import anvil_fixture, kafka_fixture

pytestmark = pytest.mark.integration

CHAIN = "31337"
MEMPOOL_FAST = {  # snapshots and pool listings often enough for a short test
    "CHAINWATCH_MEMPOOL_SNAPSHOT_INTERVAL": "2",
    "CHAINWATCH_MEMPOOL_RECONCILE_INTERVAL": "5",
}
DROPPED = "chainwatch_collector_records_dropped_total"
OUTBOX_TYPES = ("pending_tx", "tx_lifecycle", "mempool_snapshot")


# -- servers ------------------------------------------------------------------------------


broker_for_faults = kafka_fixture(
    scope="module", doc="One broker for this module; tests kill, freeze and restart it.",
    num_partitions=1)


@pytest.fixture
def broker(broker_for_faults: KafkaBroker) -> Iterator[KafkaBroker]:
    """The module's broker, running and not frozen, whatever the last test left."""
    if not broker_for_faults.running:
        broker_for_faults.start()
    try:
        yield broker_for_faults
    finally:
        thaw(broker_for_faults)


def freeze(broker: KafkaBroker) -> None:
    """SIGSTOP: the broker hangs (connections open, nothing answered), as a stuck JVM."""
    os.killpg(broker.pid, signal.SIGSTOP)


def thaw(broker: KafkaBroker) -> None:
    if broker.running:
        os.killpg(broker.pid, signal.SIGCONT)


def batch_rpc(url: str, calls: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    body = json.dumps([{"jsonrpc": "2.0", "id": i, "method": m, "params": p}
                       for i, (m, p) in enumerate(calls)]).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return sorted(json.loads(response.read()), key=lambda r: r["id"])


class Traffic(threading.Thread):
    """Pending transactions at `tx_per_s` and a block every `block_every` s on one anvil.

    Hashes of accepted transactions go to `sent`. `lock` is held while mining, so a test
    can keep blocks out of the way of an `anvil_reorg`.
    """

    def __init__(self, node: Anvil, tx_per_s: float, block_every: float | None) -> None:
        super().__init__(daemon=True, name="traffic")
        self.node = node
        self.tx_per_s = tx_per_s
        self.block_every = block_every
        self.accounts: list[str] = rpc(node.http_url, "eth_accounts", [])
        self.sent: list[str] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        tick, i, carry = 0.1, 0, 0.0
        next_block = time.monotonic() + (self.block_every or 0)
        while not self._halt.is_set():
            started = time.monotonic()
            carry += self.tx_per_s * tick
            calls: list[tuple[str, list[Any]]] = []
            while carry >= 1:
                carry -= 1
                account = self.accounts[i % len(self.accounts)]
                i += 1
                calls.append(("eth_sendTransaction", [{"from": account, "to": account,
                                                       "value": "0x1"}]))
            try:
                if calls:
                    for answer in batch_rpc(self.node.http_url, calls):
                        if "result" in answer:
                            self.sent.append(answer["result"])
                        else:
                            self.errors.append(str(answer.get("error")))
                if self.block_every and time.monotonic() >= next_block:
                    with self.lock:
                        rpc(self.node.http_url, "evm_mine", [])
                    next_block += self.block_every
            except OSError as exc:
                self.errors.append(repr(exc))
            self._halt.wait(max(0.0, tick - (time.monotonic() - started)))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


@pytest.fixture
def traffic() -> Iterator[Callable[..., Traffic]]:
    started: list[Traffic] = []

    def start(node: Anvil, tx_per_s: float, block_every: float | None) -> Traffic:
        t = Traffic(node, tx_per_s, block_every)
        t.start()
        started.append(t)
        return t

    try:
        yield start
    finally:
        for t in started:
            t.stop()


# -- reading the topics back ----------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """One message on a topic, decoded."""

    partition: int
    offset: int
    record: AnyRecord


def read_topic(broker: KafkaBroker, topic: str, timeout: float = 60) -> list[Copy]:
    """Every message on `topic`, offset 0 to the current end, on every partition."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**broker.client_config(), enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                         or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[Copy] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for tp, messages in consumer.poll(timeout_ms=500).items():
                out += [Copy(tp.partition, m.offset, decode(m.value)) for m in messages
                        if m.offset < ends[tp]]
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
        return out
    finally:
        consumer.close()


def end_offsets(broker: KafkaBroker, topics: list[str]) -> dict[tuple[str, int], int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**broker.client_config(), enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t)]
        return {(tp.topic, tp.partition): o for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def committed(broker: KafkaBroker, group: str) -> dict[tuple[str, int], int]:
    """The group's committed offsets: where a restarted member resumes."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**broker.client_config())
    try:
        offsets = admin.list_group_offsets({group: None})[group]
        return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}
    finally:
        admin.close()


@dataclass
class Topics:
    """The run's topics as lists of copies; derived sets for the accounting."""

    blocks: list[Copy]
    mempool: list[Copy]
    findings: list[Copy]

    @classmethod
    def read(cls, broker: KafkaBroker, prefix: str) -> Topics:
        return cls(*(read_topic(broker, f"{prefix}.{t}") for t in ("blocks", "mempool",
                                                                     "findings")))

    def block_hashes(self, node: str) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        for c in self.blocks:
            if isinstance(c.record, Block) and c.record.node == node:
                out.setdefault(c.record.number, set()).add(c.record.hash)
        return out

    def txs_in_blocks(self) -> set[str]:
        return {t.hash for c in self.blocks if isinstance(c.record, Block)
                for t in c.record.transactions}

    def pending(self) -> set[str]:
        return {c.record.hash for c in self.mempool if isinstance(c.record, PendingTx)}

    def by_type(self) -> dict[str, tuple[int, int]]:
        """type -> (copies, distinct event ids) over the topics the detector reads."""
        copies: Counter[str] = Counter()
        ids: dict[str, set[str]] = {}
        for c in self.blocks + self.mempool:
            copies[c.record.type] += 1
            ids.setdefault(c.record.type, set()).add(c.record.event_id)
        return {t: (copies[t], len(ids[t])) for t in copies}


def canonical(node: Anvil) -> dict[int, str]:
    """Height -> hash of the node's canonical chain, genesis to head."""
    head = int(rpc(node.http_url, "eth_blockNumber", []), 16)
    answers = batch_rpc(node.http_url, [("eth_getBlockByNumber", [hex(n), False])
                                        for n in range(head + 1)])
    return {n: a["result"]["hash"] for n, a in enumerate(answers)}


def assert_every_height_delivered(topics: Topics, node: Anvil, name: str) -> int:
    """Every height of the node's chain is on the blocks topic with the node's hash."""
    chain = canonical(node)
    delivered = topics.block_hashes(name)
    missing = [n for n, h in chain.items() if h not in delivered.get(n, set())]
    assert not missing, f"heights never delivered: {missing}"
    return max(chain)


def processed(port: int, record_type: str) -> float:
    return metric(port, "chainwatch_events_processed_total", {"type": record_type}) or 0.0


def duplicates(port: int, record_type: str) -> float:
    return metric(port, "chainwatch_duplicate_events_total", {"type": record_type}) or 0.0


def assert_detector_counted_each_record_once(port: int, topics: Topics) -> dict[str, Any]:
    """Distinct records processed once each; every copy beyond the first seen as a duplicate."""
    figures: dict[str, Any] = {}
    for record_type, (copies, distinct) in sorted(topics.by_type().items()):
        assert processed(port, record_type) == distinct, record_type
        assert duplicates(port, record_type) >= copies - distinct, record_type
        figures[record_type] = (copies, distinct, int(duplicates(port, record_type)))
    return figures


def drained(broker: KafkaBroker, group: str, prefix: str) -> bool:
    """The detector group committed up to the end of every topic it reads."""
    from kafka.errors import KafkaError

    topics = [f"{prefix}.{t}" for t in ("blocks", "mempool", "peers")]
    try:
        done = committed(broker, group)
        ends = end_offsets(broker, topics)
    except KafkaError:  # e.g. the group coordinator still loading after a restart
        return False
    return all(done.get(tp, 0) >= end for tp, end in ends.items())


def settle(broker: KafkaBroker, p: Pipeline, done: Callable[[Topics], bool], timeout: float,
           what: str) -> None:
    """Wait until the detector group has consumed every topic to its end and `done`."""
    wait_until(lambda: drained(broker, p.group, p.prefix)
               and done(Topics.read(broker, p.prefix)), timeout, what)


def by_detector(topics: Topics) -> dict[str, int]:
    """Findings on the topic per detector: what the fault made the detector say."""
    return dict(Counter(c.record.detector for c in topics.findings
                        if isinstance(c.record, Finding)))


def report(title: str, figures: dict[str, Any]) -> None:
    """The figures docs/reliability.md quotes (pytest -s shows them)."""
    print(f"\n[{title}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# -- the processes ------------------------------------------------------------------------


@dataclass
class Pipeline:
    prefix: str
    group: str
    detect_port: int
    collect_port: int
    detect_args: list[str]
    collect_args: list[str]


def pipeline(broker: KafkaBroker, nodes: list[str]) -> Pipeline:
    """Arguments for one run: fresh topics and group; `nodes` names what to follow."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    detect_port, collect_port = free_port(), free_port()
    common = ["--kafka", broker.bootstrap, "--topic-prefix", prefix, "--metrics-host",
              "127.0.0.1"]
    return Pipeline(
        prefix=prefix, group=f"g-{prefix}", detect_port=detect_port, collect_port=collect_port,
        detect_args=["detect", *common, "--group", f"g-{prefix}", "--metrics-port",
                     str(detect_port)],
        collect_args=["collect", *nodes, *common,
                      "--metrics-port", str(collect_port)],
    )


def dropped(port: int, labels: dict[str, str], record_type: str) -> float | None:
    return metric(port, DROPPED, {**labels, "type": record_type, "reason": "outbox_full"})


def bus_errors(port: int, node: str) -> float:
    return metric(port, "chainwatch_collector_errors_total", {"node": node, "kind": "bus"}) or 0


def alive(*procs: Any) -> None:
    for p in procs:
        assert p.proc.poll() is None, f"{p.log_path.name} exited"
        assert "Traceback" not in p.output(), f"{p.log_path.name} printed a traceback"


def finish(broker: KafkaBroker, p: Pipeline, collect: Any, detect: Any) -> Topics:
    """Stop the collector (no more heartbeats or snapshots), let the detector drain, read."""
    alive(collect, detect)
    collect.stop()
    wait_until(lambda: drained(broker, p.group, p.prefix), 60, "the detector to drain")
    return Topics.read(broker, p.prefix)


# -- 1. the broker crashes mid-stream -----------------------------------------------------


def test_broker_killed_mid_stream_loses_no_block_and_no_pending_tx(
    anvil: Anvil, broker: KafkaBroker, chainwatch_procs, traffic, tmp_path: Path
) -> None:
    p = pipeline(broker, node_args(anvil, str(tmp_path / "state")))
    detect = chainwatch_procs("detect", *p.detect_args)
    collect = chainwatch_procs("collect", *p.collect_args, env=MEMPOOL_FAST)
    wait_until(lambda: metric(p.detect_port, "chainwatch_head_block_number", LABELS) == 0, 60,
               "the pipeline to start")
    flow = traffic(anvil, tx_per_s=20, block_every=1.0)
    wait_until(lambda: (metric(p.detect_port, "chainwatch_head_block_number", LABELS) or 0) >= 4,
               60, "blocks and txs to flow")

    broker.kill()  # kill -9: no clean shutdown, whatever is in flight is in flight
    killed_at, down_since = canonical_head(anvil), time.monotonic()
    wait_until(lambda: bus_errors(p.collect_port, "anvil1") >= 1, 90,
               "the collector to count the dead broker")
    broker.start()  # same port, same data dir
    outage = time.monotonic() - down_since
    restarted_at = canonical_head(anvil)
    wait_until(lambda: (metric(p.detect_port, "chainwatch_head_block_number", LABELS) or 0)
               >= restarted_at + 3, 120, "blocks to flow again after the restart")
    flow.stop()
    assert not flow.errors, flow.errors[:3]
    head = canonical_head(anvil)
    sent = set(flow.sent)
    settle(broker, p, lambda t: not sent - t.pending() - t.txs_in_blocks(), 90,
           "every block and tx to be delivered")

    for t in OUTBOX_TYPES:
        assert dropped(p.collect_port, LABELS, t) == 0, f"{t} dropped"
    errors = bus_errors(p.collect_port, "anvil1")
    topics = finish(broker, p, collect, detect)

    assert assert_every_height_delivered(topics, anvil, "anvil1") == head
    assert all(len(h) == 1 for h in topics.block_hashes("anvil1").values()), "no reorg happened"
    pending = topics.pending()
    late = sent - pending  # announced after the block holding it was delivered
    assert late <= topics.txs_in_blocks(), "a sent tx is neither pending nor in a block"
    assert metric(p.detect_port, "chainwatch_pending_tx_arrivals_total", LABELS) == len(pending)
    assert metric(p.detect_port, "chainwatch_blocks_observed_total", LABELS) == head + 1
    figures = assert_detector_counted_each_record_once(p.detect_port, topics)
    report("broker kill -9", {"outage_s": round(outage), "mined_while_down":
                              restarted_at - killed_at, "heights": head + 1, "sent": len(sent),
                              "pending_on_topic": len(pending), "late_in_blocks": len(late),
                              "dropped": 0, "bus_errors": errors,
                              "copies/distinct/dups": figures, "findings": by_detector(topics)})


def canonical_head(node: Anvil) -> int:
    return int(rpc(node.http_url, "eth_blockNumber", []), 16)


# -- 2. the broker stays down longer than the collector can hold --------------------------


pool = anvil_fixture(
    doc="A second node, never mined: its pending txs stay pending, so each one either "
    "reaches the mempool topic or is a counted drop (no race with its own inclusion).",
    no_mining=True, chain_id=31338)


OUTBOX = 200  # records; the default 100k holds over an hour of mainnet pending txs
OUTAGE = 65.0  # s: past the outbox and past the Kafka producer's 60 s delivery timeout


def test_broker_down_longer_than_the_outbox_drops_and_counts_pending_txs_only(
    anvil: Anvil, pool: Anvil, broker: KafkaBroker, chainwatch_procs, traffic, tmp_path: Path
) -> None:
    path = nodes_file(tmp_path, {"chain": (anvil.http_url, anvil.ws_url),
                                 "pool": (pool.http_url, pool.ws_url)}, block_time=600)
    p = pipeline(broker, ["--nodes", path, "--state-dir", str(tmp_path / "state"),
                          "--poll-interval", "1", "--start-block", "0"])
    chain, pool_labels = {"chain_id": CHAIN, "node": "chain"}, {"chain_id": "31338",
                                                                "node": "pool"}
    detect = chainwatch_procs("detect", *p.detect_args)
    collect = chainwatch_procs("collect", *p.collect_args,
                               env={**MEMPOOL_FAST, "CHAINWATCH_MEMPOOL_MAX_OUTBOX": str(OUTBOX)})
    wait_until(lambda: metric(p.detect_port, "chainwatch_head_block_number", chain) == 0, 60,
               "the pipeline to start")
    blocks = traffic(anvil, tx_per_s=0, block_every=1.0)
    txs = traffic(pool, tx_per_s=40, block_every=None)
    wait_until(lambda: (metric(p.detect_port, "chainwatch_pending_tx_arrivals_total", pool_labels)
                        or 0) >= 50, 60, "pending txs to flow")

    broker.kill()
    killed_at, down_since = canonical_head(anvil), time.monotonic()
    wait_until(lambda: (dropped(p.collect_port, pool_labels, "pending_tx") or 0) > 0, 60,
               "the outbox to fill and drop")
    while time.monotonic() - down_since < OUTAGE:  # block following pauses at the checkpoint
        checkpoint = metric(p.collect_port, "chainwatch_collector_checkpoint_block_number", chain)
        assert checkpoint is not None and checkpoint <= killed_at, "checkpoint passed an unacked"
        time.sleep(1)
    mined_while_down = canonical_head(anvil) - killed_at
    broker.start()
    outage = time.monotonic() - down_since  # the restart (JVM start, log recovery) included
    restarted_at = canonical_head(anvil)
    wait_until(lambda: (metric(p.detect_port, "chainwatch_head_block_number", chain) or 0)
               >= restarted_at + 2, 120, "the collector to backfill and follow again")
    txs.stop()
    blocks.stop()
    assert not txs.errors and not blocks.errors, (txs.errors + blocks.errors)[:3]
    head, sent = canonical_head(anvil), set(txs.sent)

    def accounted(t: Topics) -> bool:
        return len(sent - t.pending()) == dropped(p.collect_port, pool_labels, "pending_tx")

    settle(broker, p, accounted, 90, "every pending tx on the topic or counted as dropped")
    drops = {t: dropped(p.collect_port, pool_labels, t) for t in OUTBOX_TYPES}
    errors = bus_errors(p.collect_port, "chain")
    topics = finish(broker, p, collect, detect)

    assert assert_every_height_delivered(topics, anvil, "chain") == head
    pending = topics.pending()
    assert pending <= sent
    assert drops["pending_tx"] is not None, "the collector counts its drops"
    assert len(sent - pending) == drops["pending_tx"] > 0, "each missing tx is a counted drop"
    assert metric(p.detect_port, "chainwatch_pending_tx_arrivals_total", pool_labels) == len(
        pending)
    assert metric(p.detect_port, "chainwatch_blocks_observed_total", chain) == head + 1
    figures = assert_detector_counted_each_record_once(p.detect_port, topics)
    report("broker down > outbox", {
        "outage_s": round(outage), "heights": head + 1,
        "mined_while_down": mined_while_down, "sent": len(sent), "pending_on_topic": len(pending),
        "dropped": drops, "bus_errors": errors, "copies/distinct/dups": figures,
        "findings": by_detector(topics)})


# -- 3. the collector crashes with blocks in flight -----------------------------------------


def checkpoint_head(state: Path, node: str) -> tuple[int, str]:
    """(height, hash) of the head in the collector's checkpoint file."""
    [path] = state.glob(f"checkpoint-{CHAIN}-{node}.json")
    number, block_hash, _parent = json.loads(path.read_text())["refs"][-1]
    return int(number), str(block_hash)


def test_collector_killed_with_unacked_blocks_resumes_from_its_checkpoint(
    anvil: Anvil, broker: KafkaBroker, chainwatch_procs, traffic, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    p = pipeline(broker, node_args(anvil, str(state)))
    detect = chainwatch_procs("detect", *p.detect_args)
    collect = chainwatch_procs("collect-1", *p.collect_args, env=MEMPOOL_FAST)
    wait_until(lambda: metric(p.detect_port, "chainwatch_head_block_number", LABELS) == 0, 60,
               "the pipeline to start")
    flow = traffic(anvil, tx_per_s=20, block_every=1.0)
    wait_until(lambda: (metric(p.detect_port, "chainwatch_head_block_number", LABELS) or 0) >= 4,
               60, "blocks and txs to flow")

    # A hung broker: the collector fetches new blocks and publishes them, but no ack comes.
    freeze(broker)
    frozen_at = canonical_head(anvil)
    wait_until(lambda: canonical_head(anvil) >= frozen_at + 3, 30, "blocks mined meanwhile")
    collect.kill9()  # with blocks fetched and published, unacknowledged
    killed_at = canonical_head(anvil)
    saved, saved_hash = checkpoint_head(state, "anvil1")
    assert saved <= frozen_at < killed_at, "the checkpoint must not pass an unacked block"
    thaw(broker)
    wait_until(lambda: canonical_head(anvil) >= killed_at + 3, 30, "blocks mined while it is down")
    before = end_offsets(broker, [f"{p.prefix}.blocks"])

    collect = chainwatch_procs("collect-2", *p.collect_args, env=MEMPOOL_FAST)
    restarted_at = canonical_head(anvil)
    wait_until(lambda: (metric(p.detect_port, "chainwatch_head_block_number", LABELS) or 0)
               >= restarted_at + 2, 90, "the restarted collector to backfill and follow")
    flow.stop()
    assert not flow.errors, flow.errors[:3]
    head, sent = canonical_head(anvil), set(flow.sent)
    settle(broker, p, lambda t: not sent - t.pending() - t.txs_in_blocks(), 90,
           "every block and tx to be delivered")
    topics = finish(broker, p, collect, detect)

    assert assert_every_height_delivered(topics, anvil, "anvil1") == head
    assert saved_hash in topics.block_hashes("anvil1")[saved], "a checkpointed block was acked"
    # the restarted collector starts right after its checkpoint: nothing skipped, and
    # nothing it had checkpointed sent again
    resent = sorted({c.record.number for c in topics.blocks if isinstance(c.record, Block)
                     and c.offset >= before[(f"{p.prefix}.blocks", c.partition)]})
    assert resent == list(range(saved + 1, head + 1))
    late = sent - topics.pending()
    assert late <= topics.txs_in_blocks(), "a sent tx is neither pending nor in a block"
    assert metric(p.detect_port, "chainwatch_blocks_observed_total", LABELS) == head + 1
    figures = assert_detector_counted_each_record_once(p.detect_port, topics)
    report("collector kill -9", {
        "checkpoint": saved, "frozen_at": frozen_at, "killed_at": killed_at,
        "restarted_at": restarted_at, "heights": head + 1, "republished_from": resent[0],
        "sent": len(sent), "late_in_blocks": len(late), "copies/distinct/dups": figures,
        "findings": by_detector(topics)})


# -- 4. the detector crashes mid-stream -----------------------------------------------------


def reorg(node: Anvil, flow: Traffic, depth: int = 3) -> None:
    with flow.lock:  # no block mined in the middle of it
        rpc(node.http_url, "anvil_reorg", [depth, []])


def still_known(node: Anvil, hashes: set[str]) -> set[str]:
    """The txs the node still has, pending or mined. `anvil_reorg` with no txs forgets the
    ones of the blocks it replaces: one sent and mined between two polls of the
    collector, then reorged out, was never anywhere the collector could see it."""
    ordered = sorted(hashes)
    answers = batch_rpc(node.http_url, [("eth_getTransactionByHash", [h]) for h in ordered])
    return {h for h, answer in zip(ordered, answers, strict=True) if answer.get("result")}


def reorg_copies(topics: Topics) -> list[Copy]:
    return [c for c in topics.blocks if isinstance(c.record, Reorg)]


def finding_ids(topics: Topics, detector: str | None = None) -> Counter[str]:
    return Counter(c.record.event_id for c in topics.findings if isinstance(c.record, Finding)
                   and detector in (None, c.record.detector))


def consumed_since(topics: Topics, start: dict[tuple[str, int], int], prefix: str) -> Counter[str]:
    """Records per type at or after `start` (the offsets a group member resumes from)."""
    out: Counter[str] = Counter()
    for topic, copies in (("blocks", topics.blocks), ("mempool", topics.mempool)):
        for c in copies:
            if c.offset >= start.get((f"{prefix}.{topic}", c.partition), 0):
                out[c.record.type] += 1
    return out


def assert_resumed_exactly_at(port: int, topics: Topics, start: dict[tuple[str, int], int],
                              prefix: str) -> Counter[str]:
    """The detector saw each record from `start` on once: processed + duplicates == copies."""
    expected = consumed_since(topics, start, prefix)
    for record_type, copies in expected.items():
        seen = processed(port, record_type) + duplicates(port, record_type)
        assert seen == copies, f"{record_type}: saw {seen}, {copies} on the topics since {start}"
    return expected


def test_detector_killed_mid_stream_resumes_from_committed_offsets_without_double_counting(
    anvil: Anvil, broker: KafkaBroker, chainwatch_procs, traffic, tmp_path: Path
) -> None:
    p = pipeline(broker, node_args(anvil, str(tmp_path / "state")))
    blocks_topic = f"{p.prefix}.blocks"
    reorg_findings = {"chain_id": CHAIN, "detector": "reorg_depth", "severity": "warning"}
    detect = chainwatch_procs("detect-1", *p.detect_args)
    collect = chainwatch_procs("collect", *p.collect_args, env=MEMPOOL_FAST)
    wait_until(lambda: metric(p.detect_port, "chainwatch_head_block_number", LABELS) == 0, 60,
               "the pipeline to start")
    flow = traffic(anvil, tx_per_s=20, block_every=1.0)
    wait_until(lambda: (metric(p.detect_port, "chainwatch_head_block_number", LABELS) or 0) >= 5,
               60, "blocks and txs to flow")
    reorg(anvil, flow)
    wait_until(lambda: metric(p.detect_port, "chainwatch_reorgs_total", LABELS) == 1, 30,
               "detector 1 to see the first reorg")

    def first_reorg_committed() -> bool:
        first = reorg_copies(Topics.read(broker, p.prefix))
        return bool(first) and committed(broker, p.group).get(
            (blocks_topic, first[0].partition), -1) > first[0].offset

    wait_until(first_reorg_committed, 30, "the first reorg's offset to be committed")
    time.sleep(2)  # a little more stream, so the kill lands mid-batch or between batches
    detect.kill9()
    resume = committed(broker, p.group)  # nobody commits while the group has no live member
    reorg(anvil, flow)  # the second reorg happens while no detector runs
    time.sleep(2)

    detect = chainwatch_procs("detect-2", *p.detect_args)
    wait_until(lambda: metric(p.detect_port, "chainwatch_reorgs_total", LABELS) == 1, 90,
               "detector 2 to see the second reorg")
    flow.stop()
    assert not flow.errors, flow.errors[:3]
    head, sent = canonical_head(anvil), still_known(anvil, set(flow.sent))
    settle(broker, p, lambda t: not sent - t.pending() - t.txs_in_blocks(), 90,
           "every block and tx to be delivered")
    topics = finish(broker, p, collect, detect)

    assert assert_every_height_delivered(topics, anvil, "anvil1") == head
    reorgs = reorg_copies(topics)
    assert len({c.record.event_id for c in reorgs}) == 2
    first, second = reorgs[0], reorgs[-1]
    start = resume[(blocks_topic, first.partition)]
    assert first.offset < start <= second.offset
    since = assert_resumed_exactly_at(p.detect_port, topics, resume, p.prefix)
    # the first reorg was counted by detector 1 only, the second by detector 2 only
    assert metric(p.detect_port, "chainwatch_reorgs_total", LABELS) == 1
    assert metric(p.detect_port, "chainwatch_findings_total", reorg_findings) == 1
    ids = finding_ids(topics, "reorg_depth")
    assert sorted(ids.values()) == [1, 1], "one finding per reorg, none twice"
    phase_a = {"heights": head + 1, "resumed_at_offset": start,
               "first_reorg_offset": first.offset, "second_reorg_offset": second.offset,
               "records_since": dict(since),
               "duplicate_finding_ids": sum(n - 1 for n in finding_ids(topics).values())}

    # The crash window at-least-once allows: findings acknowledged, offsets not yet
    # committed. It is milliseconds wide, so its effect is made exact by committing the
    # offset of the first reorg (as that crash would have left it) before a restart.
    from kafka import KafkaAdminClient, TopicPartition
    from kafka.structs import OffsetAndMetadata

    detect.stop()  # leaves the group at once, so its offsets can be set
    admin = KafkaAdminClient(**broker.client_config())
    try:
        admin.alter_group_offsets(p.group, {
            TopicPartition(blocks_topic, first.partition): OffsetAndMetadata(first.offset, "",
                                                                             -1)})
    finally:
        admin.close()
    rewound = {**resume, (blocks_topic, first.partition): first.offset}
    rewound.update({tp: o for tp, o in end_offsets(broker, [f"{p.prefix}.mempool"]).items()})
    detect = chainwatch_procs("detect-3", *p.detect_args)
    wait_until(lambda: metric(p.detect_port, "chainwatch_reorgs_total", LABELS) == 2, 90,
               "detector 3 to see both reorgs again")
    wait_until(lambda: drained(broker, p.group, p.prefix), 60, "detector 3 to drain")
    topics = Topics.read(broker, p.prefix)
    assert_resumed_exactly_at(p.detect_port, topics, rewound, p.prefix)
    ids = finding_ids(topics, "reorg_depth")
    assert sorted(ids.values()) == [2, 2], "redelivered: the same two findings, same ids"
    copies = [c.record for c in topics.findings if isinstance(c.record, Finding)
              and c.record.detector == "reorg_depth"]
    for finding_id in ids:  # a copy differs only in when it was made
        a, b = (f.model_dump(exclude={"observed_at"}) for f in copies if f.event_id == finding_id)
        assert a == b
    report("detector kill -9", {**phase_a, "after_rewind_reorg_finding_copies": dict(ids),
                                "findings": by_detector(topics)})
