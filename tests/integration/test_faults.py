"""The real world: Kafka goes away for a while, the node restarts. Nothing is lost."""

from __future__ import annotations

import time
import uuid

import pytest

from chainwatch.local.anvil import Anvil
from tests.integration.conftest import chain_view, free_port, metric, rpc, wait_until
from tests.integration.test_spine import LABELS, canonical_hashes, node_args
from tests.servers import running_kafka

pytestmark = pytest.mark.integration


def test_kafka_briefly_down_loses_nothing(anvil: Anvil, chainwatch_procs, tmp_path) -> None:
    with running_kafka(num_partitions=1) as broker:  # its own: this test stops it
        prefix = f"t{uuid.uuid4().hex[:8]}"
        port, collector_port = free_port(), free_port()
        chainwatch_procs("detect", "detect", "--kafka", broker.bootstrap, "--metrics-port",
                         str(port), "--metrics-host", "127.0.0.1", "--topic-prefix", prefix,
                         "--group", f"g-{prefix}")
        chainwatch_procs("collect", "collect", *node_args(anvil, str(tmp_path / "state")),
                         "--kafka", broker.bootstrap, "--topic-prefix", prefix,
                         "--metrics-port", str(collector_port), "--metrics-host", "127.0.0.1")
        rpc(anvil.http_url, "anvil_mine", ["0x3"])
        wait_until(lambda: metric(port, "chainwatch_head_block_number", LABELS) == 3, 30,
                   "the detector to reach block 3")

        broker.stop()
        for _ in range(10):  # the chain goes on while Kafka is down
            rpc(anvil.http_url, "evm_mine", [])
            time.sleep(0.3)
        wait_until(
            lambda: (metric(collector_port, "chainwatch_collector_errors_total",
                            {"node": "anvil1", "kind": "bus"}) or 0) >= 1,
            60, "the collector to count the bus failure",
        )
        checkpoint = metric(collector_port, "chainwatch_collector_checkpoint_block_number",
                            LABELS)
        assert checkpoint is not None, "the collector exports its checkpoint"
        assert checkpoint < 13, "the checkpoint must not pass unacknowledged blocks"

        broker.start()
        wait_until(lambda: metric(port, "chainwatch_head_block_number", LABELS) == 13, 90,
                   "the detector to catch up after Kafka came back")
        view = chain_view(port)[0]
        assert [n for n, _ in view["canonical"]] == list(range(14))
        assert dict(view["canonical"]) == canonical_hashes(anvil, 0, 13)
        assert metric(port, "chainwatch_blocks_observed_total", LABELS) == 14


def test_node_restart_is_survived_and_counted(anvil: Anvil, chainwatch_procs, tmp_path) -> None:
    port = free_port()
    proc = chainwatch_procs("run", "run", *node_args(anvil, str(tmp_path / "state")),
                            "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    rpc(anvil.http_url, "anvil_mine", ["0x5"])
    wait_until(lambda: metric(port, "chainwatch_head_block_number", LABELS) == 5, 30, "block 5")

    anvil.stop()  # the node goes away: RPC refused, WebSocket dropped
    wait_until(lambda: metric(port, "chainwatch_node_up", LABELS) == 0, 20, "node_up == 0")
    errors = metric(port, "chainwatch_collector_errors_total", {"node": "anvil1", "kind": "rpc"})
    assert errors is not None and errors >= 1

    anvil.restart()  # same port, a fresh chain from genesis: a reorg to a shorter chain
    rpc(anvil.http_url, "anvil_mine", ["0x8"])
    wait_until(lambda: metric(port, "chainwatch_node_up", LABELS) == 1, 30, "node_up == 1")
    wait_until(lambda: dict(chain_view(port)[0]["canonical"]).get(8)
               == canonical_hashes(anvil, 8, 8)[8], 30, "the detector to follow the new chain")
    assert metric(port, "chainwatch_reorgs_total", LABELS) == 1
    assert proc.proc is not None and proc.proc.poll() is None, "chainwatch kept running"
    assert "Traceback" not in proc.output()
