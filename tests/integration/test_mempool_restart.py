"""A restarted collector resumes following the pending txs it had announced (real anvil,
real Kafka): the ones dropped or mined while it was down still get their fate."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from chainwatch.local.anvil import Anvil
from chainwatch.local.kafka import KafkaBroker
from chainwatch.schema import AnyRecord, PendingTx, TxLifecycle, decode
from tests.integration.conftest import free_port, rpc, wait_until
from tests.integration.test_mempool_peers import send
from tests.integration.test_spine import node_args

pytestmark = pytest.mark.integration

FAST = {
    "CHAINWATCH_MEMPOOL_POLL_INTERVAL": "0.5",
    "CHAINWATCH_MEMPOOL_SNAPSHOT_INTERVAL": "1",
    "CHAINWATCH_MEMPOOL_RECONCILE_INTERVAL": "1",
    "CHAINWATCH_MEMPOOL_DROP_GRACE": "2",  # > 0: the backfill of the mined tx comes first
    "CHAINWATCH_MEMPOOL_SAVE_INTERVAL": "1",
}


def read_until(kafka: KafkaBroker, topic: str, done: Callable[[list[AnyRecord]], bool],
               what: str, timeout: float = 40) -> list[AnyRecord]:
    """The topic's records from offset 0, read until `done` holds for them."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=[kafka.bootstrap],
                             auto_offset_reset="earliest", group_id=f"reader-{uuid.uuid4().hex}",
                             session_timeout_ms=6000, heartbeat_interval_ms=1000)
    got: list[AnyRecord] = []
    try:
        def check() -> bool:
            for messages in consumer.poll(timeout_ms=500).values():
                got.extend(decode(m.value) for m in messages)
            return done(got)

        wait_until(check, timeout, what)
    finally:
        consumer.close()
    return got


def pending_hashes(records: list[AnyRecord]) -> set[str]:
    return {r.hash for r in records if isinstance(r, PendingTx)}


def fates(records: list[AnyRecord]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in records:
        if isinstance(r, TxLifecycle):
            out.setdefault(r.hash, []).append(r.fate)
    return out


class Collect:
    """`chainwatch collect` on anvil and Kafka with its own topics and state dir; each
    `start` is a new process (a restart) on the same state."""

    def __init__(self, anvil: Anvil, kafka: KafkaBroker, procs, tmp_path: Path) -> None:
        prefix = f"t{uuid.uuid4().hex[:8]}"
        self.state = tmp_path / "state"
        self.args = ["collect", *node_args(anvil, str(self.state)), "--kafka",
                     kafka.bootstrap, "--topic-prefix", prefix, "--metrics-host", "127.0.0.1"]
        self.topic = f"{prefix}.mempool"
        self.path = self.state / "mempool-31337-anvil1.json"  # the mempool state file
        self.procs = procs
        self.runs = 0

    def start(self, **env: str):
        self.runs += 1
        return self.procs(f"collect-{self.runs}", *self.args, "--metrics-port",
                          str(free_port()), env={**FAST, **env})

    def saved(self) -> dict | None:
        """The mempool state file's document; None while there is none (or mid-write)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None


def test_a_restarted_collector_reports_the_txs_dropped_or_mined_while_it_was_down(
    anvil: Anvil, kafka: KafkaBroker, chainwatch_procs, tmp_path: Path
) -> None:
    collect = Collect(anvil, kafka, chainwatch_procs, tmp_path)
    topic = collect.topic
    first = collect.start()
    wait_until(lambda: rpc(anvil.http_url, "txpool_status", []) is not None, 10, "anvil")
    a, b = rpc(anvil.http_url, "eth_accounts", [])[:2]
    doomed, mined = send(anvil, a, 0, tip_gwei=1), send(anvil, b, 0, tip_gwei=1)
    read_until(kafka, topic, lambda rs: {doomed, mined} <= pending_hashes(rs),
               "both txs published as pending")

    first.stop()  # SIGTERM: the last records are flushed, then the tracked txs saved
    assert first.proc is not None and first.proc.returncode == 0, first.output()[-2000:]
    path = collect.path
    text = path.read_text()
    assert {t["hash"] for t in json.loads(text)["pending"]} == {doomed, mined}
    assert anvil.http_url not in text and anvil.ws_url not in text

    # while the collector is down: one tx leaves the pool unmined, the other is mined
    rpc(anvil.http_url, "anvil_dropTransaction", [doomed])
    rpc(anvil.http_url, "evm_mine", [])
    block = rpc(anvil.http_url, "eth_getBlockByNumber", ["0x1", False])
    assert block["transactions"] == [mined]

    second = collect.start()
    records = read_until(kafka, topic, lambda rs: doomed in fates(rs) and mined in fates(rs),
                         "the fates of both txs after the restart")
    assert fates(records) == {doomed: ["dropped"], mined: ["included"]}
    [included] = [r for r in records if isinstance(r, TxLifecycle) and r.hash == mined]
    assert (included.block_number, included.block_hash) == (1, block["hash"])
    assert included.inclusion_delay_seconds is not None and included.inclusion_delay_seconds > 0
    assert sum(isinstance(r, PendingTx) for r in records) == 2, "nothing announced twice"

    wait_until(lambda: json.loads(path.read_text())["pending"] == [], 10,
               "the saved state to follow the acknowledged fates")
    second.stop()
    assert "mempool state restored" in second.output()


def test_a_collector_killed_after_an_inclusion_but_before_its_save_reports_no_drop(
    anvil: Anvil, kafka: KafkaBroker, chainwatch_procs, tmp_path: Path
) -> None:
    """kill -9 between an acknowledged `included` and the next state save leaves a state
    that still tracks the mined tx, while the block collector resumes after its block.
    The restarted collector fetches the blocks since the state's head again: the tx gets
    its `included` once more (same event id), never a `dropped`."""
    collect = Collect(anvil, kafka, chainwatch_procs, tmp_path)
    topic, path = collect.topic, collect.path
    first = collect.start()
    wait_until(lambda: rpc(anvil.http_url, "txpool_status", []) is not None, 10, "anvil")
    sender = rpc(anvil.http_url, "eth_accounts", [])[0]
    mined = send(anvil, sender, 0, tip_gwei=1)

    saved = collect.saved
    wait_until(lambda: (s := saved()) is not None and [t["hash"] for t in s["pending"]]
               == [mined], 20, "the state to track the pending tx")
    stale = path.read_text()
    assert json.loads(stale)["head_number"] == 0

    rpc(anvil.http_url, "evm_mine", [])
    read_until(kafka, topic, lambda rs: fates(rs).get(mined) == ["included"], "its inclusion")
    wait_until(lambda: (s := saved()) is not None and s["pending"] == [], 10,
               "the state to follow the inclusion")
    first.kill9()
    path.write_text(stale)  # as if the kill had come before that save

    second = collect.start()
    records = read_until(kafka, topic, lambda rs: len(fates(rs).get(mined, [])) >= 2,
                         "the inclusion reported again after the restart")
    wait_until(lambda: "mempool state restored" in second.output(), 10, "the restore log")
    time.sleep(2 * float(FAST["CHAINWATCH_MEMPOOL_DROP_GRACE"]) + 1)  # drops judged by now
    records = read_until(kafka, topic, lambda rs: len(rs) >= len(records), "all records")
    assert fates(records)[mined] == ["included", "included"]
    first_included, again = [r for r in records if isinstance(r, TxLifecycle)]
    assert again.event_id == first_included.event_id, "a duplicate consumers recognise"
    assert again.block_number == 1
    wait_until(lambda: (s := saved()) is not None and s["pending"] == []
               and s["head_number"] == 1, 10, "the state to follow again")


def test_a_reorg_while_the_collector_was_down_requeues_the_txs_of_the_dropped_blocks(
    anvil: Anvil, kafka: KafkaBroker, chainwatch_procs, tmp_path: Path
) -> None:
    """The block holding a followed tx is reorged out while the collector is stopped: the
    restarted block collector finds the reorg from its checkpoint, and the tracker, which
    remembered that block across the restart, re-queues the tx."""
    collect = Collect(anvil, kafka, chainwatch_procs, tmp_path)
    topic, path = collect.topic, collect.path
    first = collect.start()
    wait_until(lambda: rpc(anvil.http_url, "txpool_status", []) is not None, 10, "anvil")
    sender = rpc(anvil.http_url, "eth_accounts", [])[0]
    tx = send(anvil, sender, 0, tip_gwei=1)
    read_until(kafka, topic, lambda rs: tx in pending_hashes(rs), "the tx announced")
    rpc(anvil.http_url, "evm_mine", [])
    rpc(anvil.http_url, "anvil_mine", ["0x2"])
    mined_in = rpc(anvil.http_url, "eth_getBlockByNumber", ["0x1", False])
    assert mined_in["transactions"] == [tx]
    read_until(kafka, topic, lambda rs: fates(rs).get(tx) == ["included"], "its inclusion")

    def remembers_it() -> bool:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return data["head_number"] == 3 and any(
            b["hash"] == mined_in["hash"] and [t["hash"] for t in b["seen"]] == [tx]
            for b in data["blocks"])

    wait_until(remembers_it, 10, "the state to remember the block that holds the tx")
    first.stop()
    rpc(anvil.http_url, "anvil_reorg", [3, []])  # blocks 1-3 replaced
    assert rpc(anvil.http_url, "eth_getBlockByNumber", ["0x1", False])["hash"] != mined_in["hash"]

    collect.start()
    records = read_until(kafka, topic, lambda rs: "requeued" in fates(rs).get(tx, []),
                         "the tx re-queued after the restart")
    assert fates(records)[tx][:2] == ["included", "requeued"]
    [requeued] = [r for r in records if isinstance(r, TxLifecycle) and r.fate == "requeued"]
    assert (requeued.block_number, requeued.block_hash) == (1, mined_in["hash"])


def test_a_tx_announced_after_the_last_save_and_mined_during_a_kill_gets_its_inclusion(
    anvil: Anvil, kafka: KafkaBroker, chainwatch_procs, tmp_path: Path
) -> None:
    """kill -9 after a tx's `pending_tx` was acknowledged but before a state save held it:
    the restarted collector knows it from the journal of acknowledged announcements, and
    the block that mined it during the outage gives its `included`. Without the journal
    the tx never gets a fate record."""
    collect = Collect(anvil, kafka, chainwatch_procs, tmp_path)
    first = collect.start(CHAINWATCH_MEMPOOL_SAVE_INTERVAL="3600")  # one save: the first
    wait_until(lambda: (s := collect.saved()) is not None and s["pending"] == [], 20,
               "the first state save")
    sender = rpc(anvil.http_url, "eth_accounts", [])[0]
    mined = send(anvil, sender, 0, tip_gwei=1)
    read_until(kafka, collect.topic, lambda rs: mined in pending_hashes(rs), "its announcement")

    def journaled() -> list[Path]:
        return [p for p in collect.state.glob("mempool-31337-anvil1.journal.*")
                if mined in p.read_text()]

    wait_until(journaled, 10, "the announcement journaled once acknowledged")
    journals = journaled()
    first.kill9()
    assert collect.saved()["pending"] == []  # type: ignore[index]

    rpc(anvil.http_url, "evm_mine", [])
    block = rpc(anvil.http_url, "eth_getBlockByNumber", ["0x1", False])
    assert block["transactions"] == [mined]
    second = collect.start()
    records = read_until(kafka, collect.topic, lambda rs: mined in fates(rs),
                         "its fate after the restart")
    assert fates(records) == {mined: ["included"]}
    assert sum(isinstance(r, PendingTx) for r in records) == 1, "not announced twice"
    wait_until(lambda: (s := collect.saved()) is not None and s["pending"] == []
               and s["head_number"] == 1, 10, "the state to follow")
    second.stop()
    assert not any(p.exists() for p in journals), "gone once a state covers them"
