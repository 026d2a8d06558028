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
