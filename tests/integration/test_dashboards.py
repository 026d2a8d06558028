"""Dashboards: well-formed, generated and current, and every panel query returns data
from a real Prometheus that scraped chainwatch during a scenario."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from alerts.mixin import load_config, render
from chainwatch.local.anvil import Anvil
from chainwatch.local.geth import GethNode
from chainwatch.local.prometheus import PrometheusServer
from tests.integration.conftest import free_port, metric, rpc, wait_until
from tests.integration.test_multinode import nodes_file

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def targets(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def send_burst(url: str, senders: list[str], to: str, per_sender: int, rounds: int) -> None:
    """Many transfers fast: `rounds` rounds of `per_sender` txs from each sender, each
    round one JSON-RPC batch, then waiting until it is mined. Anvil's pool silently
    drops what it cannot hold (on a loaded machine a round was left unmined for 30 s):
    what is not mined after 20 s is sent again, up to twice.

    Nonces are explicit: anvil assigns them per call, and calls of one batch that race
    would get the same nonce (the same tx twice: "transaction already imported").
    """
    def nonces(tag: str) -> dict[str, int]:
        return {s: int(rpc(url, "eth_getTransactionCount", [s, tag]), 16) for s in senders}

    def send(since: dict[str, int], until: dict[str, int]) -> list[str]:
        calls = [{"jsonrpc": "2.0", "id": len(senders) * n + i, "method": "eth_sendTransaction",
                  "params": [{"from": sender, "to": to, "value": "0x1", "gas": hex(21_000),
                              "nonce": hex(n)}]}
                 for i, sender in enumerate(senders) for n in range(since[sender], until[sender])]
        if not calls:
            return []
        req = urllib.request.Request(url, data=json.dumps(calls).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return [str(a["error"]) for a in json.loads(resp.read()) if "error" in a]

    for _ in range(rounds):
        first = nonces("pending")
        last = {s: n + per_sender for s, n in first.items()}
        errors = send(first, last)
        assert not errors, errors[:3]

        def burst_mined(last: dict[str, int] = last) -> bool:
            return all(n >= last[s] for s, n in nonces("latest").items())

        for attempt in range(3):
            try:
                wait_until(burst_mined, 20, "the burst to be mined")
                break
            except AssertionError:
                if attempt == 2:
                    raise
                # the txs anvil still holds are refused as known; the dropped ones go in
                send(nonces("latest"), last)


def test_dashboards_are_generated_and_current():
    result = subprocess.run([sys.executable, "-m", "dashboards.build", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert {p.stem for p in DASHBOARDS} == {
        "chainwatch-overview", "chainwatch-fork-risk", "chainwatch-mempool", "chainwatch-miners"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_conventions(path: Path):
    dashboard = load(path)
    assert dashboard["uid"] == path.stem  # stable uids: links and provisioning rely on them
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names[:3] == ["datasource", "chain_id", "node"]
    assert dashboard["annotations"]["list"], "alert annotations"
    text = path.read_text()
    for panel in dashboard["panels"]:
        assert panel["description"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
    # the only datasource uid anywhere is the variable
    assert text.count('"uid": "${datasource}"') == text.count('"uid": ')  - 1  # minus own uid


@pytest.mark.integration
def test_every_panel_query_returns_series_after_a_scenario(tmp_path, chainwatch_procs):
    a, b = Anvil(), Anvil()
    geth_a, geth_b = GethNode("a"), GethNode("b")
    prometheus = PrometheusServer()
    stop = threading.Event()
    try:
        a.start(block_time=1)
        b.start(block_time=1)
        geth_a.start()
        geth_b.start()
        geth_a.add_peer(geth_b)
        path = nodes_file(tmp_path, {"anvil-a": (a.http_url, a.ws_url),
                                     "anvil-b": (b.http_url, None),
                                     "geth-a": (geth_a.http_url, None)}, block_time=2)
        port = free_port()
        chainwatch_procs(
            "run", "run", "--nodes", path, "--metrics-port", str(port),
            "--metrics-host", "127.0.0.1", "--state-dir", str(tmp_path / "state"),
            "--warmup-blocks", "10", "--poll-interval", "0.5",
            env={"CHAINWATCH_MEMPOOL_SNAPSHOT_INTERVAL": "0.5", "CHAINWATCH_PEER_INTERVAL": "1",
                 "CHAINWATCH_REFIT_EVERY_BLOCKS": "10"},
        )
        prometheus.start([f"127.0.0.1:{port}"], render(load_config()))
        accounts = rpc(a.http_url, "eth_accounts", [])

        def traffic() -> None:
            i = 0
            while not stop.wait(0.1):
                i += 1
                with contextlib.suppress(OSError):
                    rpc(a.http_url, "eth_sendTransaction",
                        [{"from": accounts[i % 5], "to": accounts[5], "value": "0x1"}])

        threading.Thread(target=traffic, daemon=True).start()
        wait_until(lambda: metric(port, "chainwatch_model_fits_total", {"chain_id": "31337"}),
                   60, "the block model to fit")
        # the transaction model scores once it has learned from 2,000 included txs: a
        # burst from four other accounts gets it there in a few blocks (and is a
        # sender_burst_rule finding, as it should be)
        send_burst(a.http_url, accounts[6:10], accounts[5], per_sender=100, rounds=6)
        wait_until(lambda: metric(port, "chainwatch_transactions_scored_total",
                                  {"chain_id": "31337"}), 90, "the transaction model to score")
        rpc(a.http_url, "anvil_reorg", [2, []])
        time.sleep(20)  # let Prometheus collect enough samples for the rate() windows

        empty = []
        for dashboard_path in DASHBOARDS:
            for title, expr in targets(load(dashboard_path)):
                query = expr.replace("$chain_id", ".*").replace("$node", ".*")
                if not prometheus.query(query):
                    empty.append(f"{dashboard_path.stem} / {title}: {query}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
    finally:
        stop.set()
        prometheus.close()
        for node in (a, b):
            node.stop()
        for geth in (geth_a, geth_b):
            geth.close()
