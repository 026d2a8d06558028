"""Mempool and peers on real nodes: pending txs to their fate on anvil, churn on geth."""

from __future__ import annotations

import uuid

import pytest

from chainwatch.local.anvil import Anvil
from chainwatch.local.geth import CHAIN_ID, GethNode
from chainwatch.local.kafka import KafkaBroker
from chainwatch.schema import PeerSnapshot, decode
from tests.integration.conftest import free_port, metric, rpc, wait_until
from tests.integration.test_multinode import nodes_file
from tests.integration.test_spine import read_topic

pytestmark = pytest.mark.integration

FAST = {
    "CHAINWATCH_MEMPOOL_POLL_INTERVAL": "0.5",
    "CHAINWATCH_MEMPOOL_SNAPSHOT_INTERVAL": "1",
    "CHAINWATCH_MEMPOOL_RECONCILE_INTERVAL": "1",
    "CHAINWATCH_MEMPOOL_DROP_GRACE": "0",
    "CHAINWATCH_PEER_INTERVAL": "0.5",
}


def fates(port: int, node: str) -> dict[str, float | None]:
    return {
        fate: metric(port, "chainwatch_tx_lifecycle_total",
                     {"chain_id": "31337", "node": node, "fate": fate})
        for fate in ("included", "replaced", "dropped", "requeued")
    }


def send(node: Anvil, sender: str, nonce: int, tip_gwei: int) -> str:
    return rpc(node.http_url, "eth_sendTransaction", [{
        "from": sender, "to": sender, "value": "0x1", "nonce": hex(nonce),
        "maxPriorityFeePerGas": hex(tip_gwei * 10**9), "maxFeePerGas": hex(tip_gwei * 100 * 10**9),
    }])


def test_pending_transactions_are_followed_to_their_fate(anvil: Anvil, chainwatch_procs, tmp_path):
    port = free_port()
    chainwatch_procs("run", "run", "--rpc", anvil.http_url, "--ws", anvil.ws_url, "--node", "m",
                     "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
                     "--state-dir", str(tmp_path / "state"), "--poll-interval", "0.5", env=FAST)
    labels = {"chain_id": "31337", "node": "m"}
    wait_until(lambda: metric(port, "chainwatch_head_block_number", labels) == 0, 30, "start")
    a, b, c = rpc(anvil.http_url, "eth_accounts", [])[:3]

    send(anvil, a, 0, tip_gwei=1)  # will be included
    send(anvil, b, 0, tip_gwei=1)  # replaced by the next one
    doomed = send(anvil, c, 0, tip_gwei=1)
    # the replacement only once its original was seen: replaced before the collector's
    # subscription was live and before its first txpool listing, the original would
    # never be anywhere to be seen (CI once timed out waiting for 4 arrivals)
    wait_until(lambda: metric(port, "chainwatch_pending_tx_arrivals_total", labels) == 3, 20,
               "3 pending transactions seen")
    send(anvil, b, 0, tip_gwei=5)  # same sender and nonce, higher fees
    wait_until(lambda: metric(port, "chainwatch_pending_tx_arrivals_total", labels) == 4, 20,
               "4 pending transactions seen")
    wait_until(lambda: fates(port, "m")["replaced"] == 1, 10, "the replacement")
    assert metric(port, "chainwatch_mempool_pending_transactions", labels) is not None

    rpc(anvil.http_url, "anvil_dropTransaction", [doomed])
    wait_until(lambda: fates(port, "m")["dropped"] == 1, 20, "the dropped transaction")

    rpc(anvil.http_url, "evm_mine", [])
    wait_until(lambda: fates(port, "m")["included"] == 2, 20, "two inclusions")
    assert metric(port, "chainwatch_tx_inclusion_delay_seconds_count", labels) == 2

    # a reorg that drops the block with both transactions: they are re-queued
    rpc(anvil.http_url, "anvil_mine", ["0x2"])
    rpc(anvil.http_url, "anvil_reorg", [3, []])
    wait_until(lambda: fates(port, "m")["requeued"] == 2, 20, "two re-queued transactions")


def test_a_removed_peer_shows_in_peer_metrics_and_as_a_churn_event(
    kafka: KafkaBroker, chainwatch_procs, tmp_path
) -> None:
    a, b, c = GethNode("a"), GethNode("b"), GethNode("c")
    try:
        for node in (a, b, c):
            node.start()
        a.add_peer(b)
        a.add_peer(c)
        wait_until(lambda: a.peer_count() == 2, 20, "geth-a to have two peers")
        prefix = f"t{uuid.uuid4().hex[:8]}"
        port = free_port()
        path = nodes_file(tmp_path, {"geth-a": (a.http_url, a.ws_url)}, block_time=600)
        chainwatch_procs("detect", "detect", "--kafka", kafka.bootstrap, "--metrics-port",
                         str(port), "--metrics-host", "127.0.0.1", "--topic-prefix", prefix,
                         "--group", f"g-{prefix}")
        chainwatch_procs("collect", "collect", "--nodes", path, "--kafka", kafka.bootstrap,
                         "--topic-prefix", prefix, "--metrics-port", str(free_port()),
                         "--metrics-host", "127.0.0.1", "--state-dir", str(tmp_path / "s"),
                         env=FAST)
        labels = {"chain_id": str(CHAIN_ID), "node": "geth-a"}
        wait_until(lambda: metric(port, "chainwatch_peer_count", labels) == 2, 30, "2 peers")
        assert metric(port, "chainwatch_peers", {**labels, "direction": "outbound"}) == 2
        assert metric(port, "chainwatch_peers_by_client", {**labels, "client": "Geth"}) == 2
        assert metric(port, "chainwatch_peer_connects_total", labels) == 2

        a.remove_peer(c)
        wait_until(lambda: metric(port, "chainwatch_peer_count", labels) == 1, 20, "1 peer")
        wait_until(lambda: metric(port, "chainwatch_peer_disconnects_total", labels) == 1, 10,
                   "one disconnect counted")

        def churn() -> list[PeerSnapshot]:
            snapshots = [decode(m.value) for m in read_topic(kafka, f"{prefix}.peers", 1)]
            return [s for s in snapshots if isinstance(s, PeerSnapshot) and s.disconnected]

        [event] = wait_until(churn, 20, "a peer_snapshot with the disconnect")
        assert len(event.disconnected) == 1 and event.peer_count == 1
        c_id = c.rpc("admin_nodeInfo")["id"]
        assert c_id not in event.model_dump_json()  # only hashed ids leave chainwatch
    finally:
        for node in (a, b, c):
            node.close()
