"""Many nodes from one process: reachability on real geth nodes, splits between anvils."""

from __future__ import annotations

from pathlib import Path

import pytest

from chainwatch.local.anvil import Anvil
from chainwatch.local.geth import CHAIN_ID, GethNode
from tests.integration.conftest import free_port, metric, rpc, wait_until

pytestmark = pytest.mark.integration


def nodes_file(tmp_path: Path, nodes: dict[str, tuple[str, str | None]], block_time: float) -> str:
    lines = ["nodes:"]
    for name, (http, ws) in nodes.items():
        lines += [f"  - name: {name}", f"    rpc: {http}",
                  f"    expected_block_time: {block_time}"]
        if ws:
            lines.append(f"    ws: {ws}")
    path = tmp_path / "nodes.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def node_state(port: int, chain_id: int, node: str) -> str | None:
    for state in ("up", "lagging", "stalled", "unreachable"):
        labels = {"chain_id": str(chain_id), "node": node, "state": state}
        if metric(port, "chainwatch_node_state", labels) == 1:
            return state
    return None


@pytest.fixture
def geth_pair():
    a, b = GethNode("a"), GethNode("b")
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.close()
        b.close()


def test_a_stopped_node_turns_unreachable_and_comes_back_up(geth_pair, chainwatch_procs, tmp_path):
    a, b = geth_pair
    a.add_peer(b)
    port = free_port()
    path = nodes_file(tmp_path, {"geth-a": (a.http_url, a.ws_url), "geth-b": (b.http_url, None)},
                      block_time=600)
    chainwatch_procs("run", "run", "--nodes", path, "--metrics-port", str(port),
                     "--metrics-host", "127.0.0.1", "--state-dir", str(tmp_path / "state"),
                     "--poll-interval", "0.5")
    for node in ("geth-a", "geth-b"):

        def is_up(node: str = node) -> bool:
            return node_state(port, CHAIN_ID, node) == "up"

        wait_until(is_up, 30, f"{node} to be up")

    b.stop()
    wait_until(lambda: node_state(port, CHAIN_ID, "geth-b") == "unreachable", 20,
               "geth-b to turn unreachable")
    assert node_state(port, CHAIN_ID, "geth-a") == "up"
    assert metric(port, "chainwatch_node_up", {"chain_id": str(CHAIN_ID), "node": "geth-b"}) == 0
    errors = metric(port, "chainwatch_collector_errors_total", {"node": "geth-b", "kind": "rpc"})
    assert errors is not None and errors >= 1

    b.start()
    wait_until(lambda: node_state(port, CHAIN_ID, "geth-b") == "up", 30, "geth-b to come back")
    labels = {"chain_id": str(CHAIN_ID), "node": "geth-b"}
    assert metric(port, "chainwatch_node_state_transitions_total",
                  {**labels, "state": "unreachable"}) == 1
    assert metric(port, "chainwatch_node_state_transitions_total", {**labels, "state": "up"}) == 2
    assert metric(port, "chainwatch_findings_total",
                  {"chain_id": str(CHAIN_ID), "detector": "node_state",
                   "severity": "critical"}) == 1


def test_two_nodes_that_diverge_are_a_chain_split_at_the_right_height(chainwatch_procs, tmp_path):
    genesis_time = 1_750_000_000
    left, right = Anvil(), Anvil()
    try:
        for node in (left, right):
            node.start(no_mining=True, timestamp=genesis_time)
        # blocks 1-3: identical empty blocks on both (same timestamps)
        for n in range(1, 4):
            for node in (left, right):
                rpc(node.http_url, "evm_setNextBlockTimestamp", [genesis_time + 12 * n])
                rpc(node.http_url, "evm_mine", [])
        assert (rpc(left.http_url, "eth_getBlockByNumber", ["0x3", False])["hash"]
                == rpc(right.http_url, "eth_getBlockByNumber", ["0x3", False])["hash"])
        # from block 4 on, each node mines a different transaction: the chains split
        accounts = rpc(left.http_url, "eth_accounts", [])
        for n in range(4, 7):
            for i, node in enumerate((left, right)):
                rpc(node.http_url, "eth_sendTransaction",
                    [{"from": accounts[0], "to": accounts[1 + i], "value": hex(10**15 * n)}])
                rpc(node.http_url, "evm_setNextBlockTimestamp", [genesis_time + 12 * n])
                rpc(node.http_url, "evm_mine", [])

        port = free_port()
        path = nodes_file(tmp_path, {"left": (left.http_url, left.ws_url),
                                     "right": (right.http_url, right.ws_url)}, block_time=3600)
        chainwatch_procs("run", "run", "--nodes", path, "--metrics-port", str(port),
                         "--metrics-host", "127.0.0.1", "--state-dir", str(tmp_path / "state"),
                         "--start-block", "0", "--poll-interval", "0.5")
        labels = {"chain_id": "31337", "node": "left", "other_node": "right"}
        wait_until(lambda: metric(port, "chainwatch_chain_split_blocks", labels) == 3, 30,
                   "a 3-block split between left and right")
        assert metric(port, "chainwatch_chain_split_point_block_number", labels) == 3
        assert metric(port, "chainwatch_chain_splits_total", {"chain_id": "31337"}) == 1
        # a batch's findings are counted once all its detectors ran, a moment after the
        # split gauges were set
        split_findings = {"chain_id": "31337", "detector": "chain_split", "severity": "critical"}
        wait_until(lambda: metric(port, "chainwatch_findings_total", split_findings) == 1, 30,
                   "the split's critical finding")
    finally:
        left.stop()
        right.stop()
