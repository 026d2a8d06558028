"""The spine end to end on real servers: anvil → collector → Kafka → detector → /metrics."""

from __future__ import annotations

import uuid

import pytest

from chainwatch.local.anvil import Anvil
from chainwatch.local.kafka import KafkaBroker
from tests.integration.conftest import chain_view, free_port, metric, rpc, wait_until

pytestmark = pytest.mark.integration

LABELS = {"chain_id": "31337", "node": "anvil1"}


def node_args(node: Anvil, state_dir: str) -> list[str]:
    return ["--rpc", node.http_url, "--ws", node.ws_url, "--node", "anvil1",
            "--state-dir", state_dir, "--poll-interval", "1", "--start-block", "0"]


def head(node: Anvil) -> int:
    return int(rpc(node.http_url, "eth_blockNumber", []), 16)


def canonical_hashes(node: Anvil, first: int, last: int) -> dict[int, str]:
    return {n: rpc(node.http_url, "eth_getBlockByNumber", [hex(n), False])["hash"]
            for n in range(first, last + 1)}


def assert_reorg_of_depth_3_is_seen(node: Anvil, metrics_port: int) -> None:
    rpc(node.http_url, "anvil_mine", ["0xa"])
    wait_until(lambda: metric(metrics_port, "chainwatch_head_block_number", LABELS) == 10,
               30, "the detector to reach block 10")
    assert metric(metrics_port, "chainwatch_reorgs_total", LABELS) == 0
    rpc(node.http_url, "anvil_reorg", [3, []])
    wait_until(lambda: metric(metrics_port, "chainwatch_reorgs_total", LABELS) == 1,
               10, "chainwatch_reorgs_total == 1 within 10 s")
    depth = {**LABELS}
    assert metric(metrics_port, "chainwatch_reorg_depth_blocks_count", depth) == 1
    assert metric(metrics_port, "chainwatch_reorg_depth_blocks_sum", depth) == 3
    assert metric(metrics_port, "chainwatch_reorg_depth_blocks_bucket", {**depth, "le": "2.0"}) == 0
    assert metric(metrics_port, "chainwatch_reorg_depth_blocks_bucket", {**depth, "le": "3.0"}) == 1
    # the detector's canonical chain is the node's new one
    def switched() -> bool:
        view = {n: h for n, h in chain_view(metrics_port)[0]["canonical"]}
        return view.get(10) == canonical_hashes(node, 10, 10)[10]

    wait_until(switched, 10, "the detector to follow the new branch")
    assert metric(metrics_port, "chainwatch_findings_total",
                  {"chain_id": "31337", "detector": "reorg_depth", "severity": "warning"}) == 1


def test_reorg_through_kafka_with_collector_and_detector_as_separate_processes(
    anvil: Anvil, kafka: KafkaBroker, chainwatch_procs, tmp_path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    port = free_port()
    chainwatch_procs("detect", "detect", "--kafka", kafka.bootstrap, "--metrics-port", str(port),
                     "--metrics-host", "127.0.0.1", "--topic-prefix", prefix,
                     "--group", f"g-{prefix}")
    chainwatch_procs("collect", "collect", *node_args(anvil, str(tmp_path / "state")),
                     "--kafka", kafka.bootstrap, "--topic-prefix", prefix,
                     "--metrics-port", str(free_port()), "--metrics-host", "127.0.0.1")
    assert_reorg_of_depth_3_is_seen(anvil, port)


def test_reorg_in_embedded_mode(anvil: Anvil, chainwatch_procs, tmp_path) -> None:
    port = free_port()
    chainwatch_procs("run", "run", *node_args(anvil, str(tmp_path / "state")),
                     "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    assert_reorg_of_depth_3_is_seen(anvil, port)


def test_collector_killed_and_restarted_backfills_every_height_exactly_once(
    anvil: Anvil, kafka: KafkaBroker, chainwatch_procs, tmp_path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    port = free_port()
    state = str(tmp_path / "state")
    chainwatch_procs("detect", "detect", "--kafka", kafka.bootstrap, "--metrics-port", str(port),
                     "--metrics-host", "127.0.0.1", "--topic-prefix", prefix,
                     "--group", f"g-{prefix}")
    collect_args = ["collect", *node_args(anvil, state), "--kafka", kafka.bootstrap,
                    "--topic-prefix", prefix,
                    "--metrics-host", "127.0.0.1"]
    collector = chainwatch_procs("collect-1", *collect_args, "--metrics-port", str(free_port()))
    rpc(anvil.http_url, "anvil_mine", ["0x5"])
    wait_until(lambda: metric(port, "chainwatch_head_block_number", LABELS) == 5,
               30, "the detector to reach block 5")

    collector.kill9()
    rpc(anvil.http_url, "anvil_mine", ["0x14"])  # 20 blocks while the collector is down
    assert head(anvil) == 25
    chainwatch_procs("collect-2", *collect_args, "--metrics-port", str(free_port()))
    wait_until(lambda: metric(port, "chainwatch_head_block_number", LABELS) == 25,
               30, "the restarted collector to backfill up to block 25")

    view = chain_view(port)[0]
    heights = [n for n, _ in view["canonical"]]
    assert heights == list(range(0, 26)), "every height exactly once, no gap"
    expected = canonical_hashes(anvil, 0, 25)
    assert {n: h for n, h in view["canonical"]} == expected
    # at-least-once delivery, but each block counted once
    assert metric(port, "chainwatch_blocks_observed_total", LABELS) == 26


def read_topic(kafka: KafkaBroker, topic: str, expect: int, timeout: float = 20) -> list:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=[kafka.bootstrap],
                             auto_offset_reset="earliest", group_id=f"reader-{uuid.uuid4().hex}",
                             session_timeout_ms=6000, heartbeat_interval_ms=1000)
    got: list = []
    try:
        def enough() -> bool:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(records)
            return len(got) >= expect

        wait_until(enough, timeout, f"{expect} message(s) on {topic}")
    finally:
        consumer.close()
    return got


def test_poison_message_goes_to_the_dead_letter_topic_and_findings_reach_kafka(
    anvil: Anvil, kafka: KafkaBroker, chainwatch_procs, tmp_path
) -> None:
    import base64
    import json

    from kafka import KafkaProducer

    from chainwatch.schema import Finding, decode

    prefix = f"t{uuid.uuid4().hex[:8]}"
    port = free_port()
    chainwatch_procs("detect", "detect", "--kafka", kafka.bootstrap, "--metrics-port", str(port),
                     "--metrics-host", "127.0.0.1", "--topic-prefix", prefix,
                     "--group", f"g-{prefix}")
    wait_until(lambda: metric(port, "chainwatch_build_info") == 1, 30, "the detector to start")
    producer = KafkaProducer(bootstrap_servers=[kafka.bootstrap], acks="all")
    producer.send(f"{prefix}.blocks", key=b"31337:anvil1", value=b"\xffnot a record")
    producer.flush()
    producer.close()
    wait_until(lambda: metric(port, "chainwatch_invalid_records_total",
                              {"topic": f"{prefix}.blocks"}) == 1, 20, "the poison to be counted")
    [dead] = read_topic(kafka, f"{prefix}.deadletter", 1)
    envelope = json.loads(dead.value)
    assert dead.key == b"31337:anvil1"
    assert base64.b64decode(envelope["payload_base64"]) == b"\xffnot a record"
    assert envelope["error"].startswith("undecodable record") or "invalid" in envelope["error"]

    # the detector keeps going: a reorg after the poison is processed and its finding published
    chainwatch_procs("collect", "collect", *node_args(anvil, str(tmp_path / "state")),
                     "--kafka", kafka.bootstrap, "--topic-prefix", prefix,
                     "--metrics-port", str(free_port()), "--metrics-host", "127.0.0.1")
    assert_reorg_of_depth_3_is_seen(anvil, port)
    [message] = read_topic(kafka, f"{prefix}.findings", 1)
    finding = decode(message.value)
    assert isinstance(finding, Finding)
    assert (finding.detector, finding.severity) == ("reorg_depth", "warning")
    assert finding.node == "anvil1"
    assert message.key == b"31337:anvil1"
