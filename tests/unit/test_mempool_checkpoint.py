"""The tracked pending txs outlive a collector restart, and their saved state never runs
ahead of what the bus acknowledged."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chainwatch.bus import Bus, EmbeddedBus, Topics
from chainwatch.exceptions import ConfigError
from chainwatch.metrics import Metrics
from chainwatch.schema import decode
from collector.checkpoint import FileCheckpointStore
from collector.mempool import MempoolTracker
from collector.mempool_service import MempoolCollector, MempoolConfig
from tests.fakes import FlakyBus
from tests.unit.test_mempool import GENESIS, block, fates, pending, raw_tx, reorg, tracking

SENDER_B = "0x" + "cc" * 20


def roundtrip(tracker: MempoolTracker) -> dict[str, Any]:
    return json.loads(json.dumps(tracker.export()))  # as the state file holds it


# --- the tracker: export / restore --------------------------------------------------------


def test_a_restored_tracker_follows_its_txs_to_inclusion_and_to_a_drop():
    mined, lost = pending(0, at=100.0), pending(1, at=101.0)
    before = tracking(mined, lost, grace_seconds=30)
    after = MempoolTracker(1, "n", grace_seconds=30)
    assert after.restore(roundtrip(before), now=500.0) == []
    assert after.export() == before.export(), "same txs, same tracking order"
    assert after.on_pending(lost) == [], "a restored tx is not announced again"

    [included] = after.on_blocks([block(1, GENESIS, mined, observed_at=510.0)], now=510.0)
    assert (included.fate, included.hash) == ("included", mined.hash)
    assert included.inclusion_delay_seconds == 410.0  # from the first sighting, before restart
    assert after.on_pool_contents(set(), now=520.0) == []  # the grace starts again
    assert fates(after.on_pool_contents(set(), now=550.0)) == [("dropped", lost.hash)]
    assert after.tracked_count == 0


def test_a_reorg_found_after_a_restart_requeues_the_txs_of_the_dropped_blocks():
    """The remembered blocks are saved too: a reorg that the restarted block collector
    finds from its checkpoint (it happened while the collector was down) puts the txs of
    the dropped block back as pending, as it would without the restart."""
    mined, other = pending(0, at=100.0), pending(1, at=101.0)
    before = tracking(mined, other)
    one = block(1, GENESIS, mined, observed_at=110.0)
    before.on_blocks([one], now=110.0)
    after = MempoolTracker(1, "n")
    after.restore(roundtrip(before), now=500.0)
    assert after.export() == before.export()
    assert after.on_pending(mined) == [], "known as included: a stale announcement"

    replacement = block(1, GENESIS, branch="b")
    [requeued] = after.on_blocks([reorg([one], replacement), replacement], now=510.0)
    assert (requeued.fate, requeued.hash, requeued.block_hash) == ("requeued", mined.hash,
                                                                   one.hash)
    assert [t["hash"] for t in after.export()["pending"]] == [other.hash, mined.hash]


def test_the_state_keeps_the_last_blocks_a_reorg_found_at_a_restart_can_drop():
    from collector.mempool import SAVED_BLOCKS

    tracker = MempoolTracker(1, "n")
    parent = GENESIS
    for number in range(1, SAVED_BLOCKS + 7):
        b = block(number, parent)
        tracker.on_blocks([b], now=float(number))
        parent = b.hash
    numbers = [b["number"] for b in tracker.export()["blocks"]]
    assert numbers == list(range(7, SAVED_BLOCKS + 7))  # the newest, oldest first


def test_restored_txs_older_than_drop_after_are_expired_with_their_dropped_records():
    old, young = pending(0, at=100.0), pending(1, at=3000.0)
    after = MempoolTracker(1, "n", drop_after_seconds=3600)
    expired = after.restore(roundtrip(tracking(old, young)), now=4000.0)
    assert fates(expired) == [("dropped", old.hash)]
    assert [t["hash"] for t in after.export()["pending"]] == [young.hash]


def test_a_restore_beyond_max_tracked_keeps_the_newest_and_counts_evictions():
    txs = [pending(i, at=float(i)) for i in range(5)]
    after = MempoolTracker(1, "n", max_tracked=3)
    after.restore(roundtrip(tracking(*txs)), now=10.0)
    assert [t["hash"] for t in after.export()["pending"]] == [t.hash for t in txs[2:]]
    assert after.evicted == 2


def _foreign(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = roundtrip(tracking(pending(0)))
    change(data)
    return data


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ([1, 2], "not a chainwatch mempool state"),
        ({"refs": []}, "not a chainwatch mempool state"),  # a block checkpoint
        (_foreign(lambda d: d.update(version=2)), "version 2"),
        (_foreign(lambda d: d.update(chain_id=5)), "another chain or node"),
        (_foreign(lambda d: d.update(node="other")), "another chain or node"),
        (_foreign(lambda d: d.update(pending={})), "pending is not a list"),
        (_foreign(lambda d: d.update(head_number="12")), "head_number '12' is not a height"),
        (_foreign(lambda d: d.update(head_number=-1)), "head_number -1 is not a height"),
        (_foreign(lambda d: d.update(blocks={})), "blocks is not a list"),
        (_foreign(lambda d: d.update(blocks=[{"hash": "0xab", "number": "1"}])),
         "a remembered block is malformed"),
        (_foreign(lambda d: d.update(blocks=[{"hash": "0xab", "number": 1, "hashes": [],
                                               "seen": [{"hash": "0x1"}]}])),
         "invalid tx in a block"),
        (_foreign(lambda d: d["pending"][0].pop("hash")), "invalid tx"),
        (_foreign(lambda d: d["pending"][0].update(node="other")), "a tx of another"),
    ],
)
def test_a_foreign_state_is_refused_in_one_line_and_the_tracker_stays_empty(data, why):
    tracker = MempoolTracker(1, "n")
    with pytest.raises(ValueError, match=why) as caught:
        tracker.restore(data, now=10.0)
    assert "\n" not in str(caught.value)
    assert tracker.tracked_count == 0


# --- the collector: where and when the state is saved ------------------------------------


class Pool:
    """A node's txpool: txpool_content lists `txs`."""

    node = "n"
    chain_id = 1

    def __init__(self, *txs: dict[str, Any], head: int = 0) -> None:
        self.txs = list(txs)
        self.head = head

    async def latest_number(self) -> int:
        return self.head

    async def call(self, method: str, params: list[Any]) -> Any:
        if method == "txpool_status":
            return {"pending": hex(len(self.txs)), "queued": "0x0"}
        by_sender: dict[str, dict[str, Any]] = {}
        for tx in self.txs:
            by_sender.setdefault(tx["from"], {})[str(int(tx["nonce"], 16))] = tx
        return {"pending": by_sender, "queued": {}}


FAST = MempoolConfig(poll_interval=0.02, snapshot_interval=0.1, reconcile_interval=0.05,
                     save_interval=0.05, final_flush_timeout=0.3)


def collector(rpc: Pool, bus: Bus, state_dir: Path, config: MempoolConfig = FAST,
              metrics: Metrics | None = None) -> MempoolCollector:
    return MempoolCollector(rpc, bus, Topics(), metrics or Metrics(), config,  # type: ignore[arg-type]
                            state=FileCheckpointStore(state_dir, prefix="mempool"))


def saved(state_dir: Path) -> list[str] | None:
    """The hashes in the state file; None while there is none (or not one of ours)."""
    try:
        data = FileCheckpointStore(state_dir, prefix="mempool").read(1, "n")
        return [t["hash"] for t in data["pending"]]  # type: ignore[index]
    except (ConfigError, KeyError, TypeError):
        return None


async def until(check: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run_until_tracked(mempool: MempoolCollector, count: int, what: str,
                      backfill: list[Any] | None = None) -> None:
    """One run of the collector until it tracks `count` txs, then a clean stop. `backfill`:
    blocks the block collector delivers before the mempool collector's run sees the chain."""

    async def main() -> None:
        if backfill:
            mempool.on_chain(backfill)
        stop = asyncio.Event()
        task = asyncio.create_task(mempool.run(stop))
        await until(lambda: mempool.tracker and mempool.tracker.tracked_count == count, what)
        stop.set()
        await task

    asyncio.run(main())


def test_the_saved_state_never_holds_a_fate_still_waiting_for_the_bus(tmp_path: Path):
    tx_a, tx_b = raw_tx(0), raw_tx(0, sender=SENDER_B)
    a, b = tx_a["hash"], tx_b["hash"]
    rpc, bus = Pool(tx_a), FlakyBus()
    mempool = collector(rpc, bus, tmp_path)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mempool.run(stop))
        await until(lambda: saved(tmp_path) == [a], "A saved once its pending record is acked")

        bus.down = True  # nothing is acknowledged from here on
        rpc.txs = [tx_b]  # B announced, A mined
        mined = pending(0, at=1.0)
        assert mined.hash == a
        mempool.on_chain([block(1, GENESIS, mined)])
        await until(lambda: mempool.tracker and mempool.tracker.tracked_count == 1
                    and mempool.tracker.export()["pending"][0]["hash"] == b, "B tracked")
        await asyncio.sleep(0.5)  # ten save intervals, dozens of failed flushes
        assert saved(tmp_path) == [a], "A's inclusion and B's announcement are not acked yet"
        assert len(mempool.outbox) > 0

        bus.down = False
        await until(lambda: saved(tmp_path) == [b], "the state once the bus took the records")
        stop.set()
        await task

    asyncio.run(main())
    records = [decode(v) for v in bus.acked]
    assert ("included", a) in fates(records)


def test_a_shutdown_with_the_bus_down_keeps_the_last_acknowledged_state(tmp_path: Path):
    tx_a, tx_b = raw_tx(0), raw_tx(0, sender=SENDER_B)
    rpc, bus = Pool(tx_a), FlakyBus()
    mempool = collector(rpc, bus, tmp_path)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mempool.run(stop))
        await until(lambda: saved(tmp_path) == [tx_a["hash"]], "A saved")
        bus.down = True
        rpc.txs.append(tx_b)
        await until(lambda: mempool.tracker and mempool.tracker.tracked_count == 2, "B tracked")
        stop.set()
        await task  # the final flush fails: no final save

    asyncio.run(main())
    assert saved(tmp_path) == [tx_a["hash"]]


def test_a_clean_shutdown_saves_what_the_bus_took_since_the_last_save(tmp_path: Path):
    tx_a, tx_b = raw_tx(0), raw_tx(0, sender=SENDER_B)
    rpc = Pool(tx_a)
    slow = MempoolConfig(poll_interval=0.02, snapshot_interval=0.1, reconcile_interval=0.05,
                         save_interval=3600)
    mempool = collector(rpc, EmbeddedBus(), tmp_path, slow)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mempool.run(stop))
        await until(lambda: saved(tmp_path) == [tx_a["hash"]], "the first save")
        rpc.txs.append(tx_b)
        await until(lambda: mempool.tracker and mempool.tracker.tracked_count == 2, "B tracked")
        assert saved(tmp_path) == [tx_a["hash"]], "not due before an hour"
        stop.set()
        await task

    asyncio.run(main())
    assert saved(tmp_path) == [tx_a["hash"], tx_b["hash"]]


def test_a_restarted_collector_reports_the_txs_mined_or_dropped_while_it_was_down(
    tmp_path: Path,
):
    tx_a, tx_b = raw_tx(0), raw_tx(0, sender=SENDER_B)
    a, b = tx_a["hash"], tx_b["hash"]
    config = MempoolConfig(poll_interval=0.02, snapshot_interval=0.1, reconcile_interval=0.05,
                           drop_grace=0.2)

    run_until_tracked(collector(Pool(tx_a, tx_b, head=5), EmbeddedBus(), tmp_path, config), 2,
                      "A and B")
    assert saved(tmp_path) == [a, b]
    # no block delivered yet: the node's head when listing began (A and B mined after it)
    assert json.loads((tmp_path / "mempool-1-n.json").read_text())["head_number"] == 5

    # down meanwhile: A was mined, B left the pool
    bus = EmbeddedBus()
    consumer = bus.consumer([Topics().mempool], "test")
    run_until_tracked(collector(Pool(), bus, tmp_path, config), 0, "B dropped",
                      backfill=[block(1, GENESIS, pending(0, at=1.0))])
    records = [decode(m.value) for m in consumer.poll(0.01, 1000)]
    assert sorted(fates(records)) == [("dropped", b), ("included", a)]
    assert not any(r.type == "pending_tx" for r in records), "nothing announced twice"
    assert saved(tmp_path) == []


class ChainPool(Pool):
    """A txpool whose node also serves blocks by number (the block collector's calls)."""

    def __init__(self, *txs: dict[str, Any], blocks: list[Any]) -> None:
        super().__init__(*txs)
        self.blocks = {b.number: b for b in blocks}
        self.fetched: list[int] = []

    async def latest_number(self) -> int:
        return max(self.blocks)

    async def block_by_number(self, number: int) -> Any:
        self.fetched.append(number)
        return self.blocks.get(number)


def test_after_a_kill_the_blocks_since_the_saved_head_are_fetched_again(tmp_path: Path):
    """Killed after A's inclusion (block 2) was acknowledged but before the next save:
    the state still tracks A, and the block collector resumes after block 2. Without
    fetching block 2 again, A would get a `dropped` record besides its `included`."""
    tx_a, tx_b = raw_tx(0), raw_tx(0, sender=SENDER_B)
    a, b = tx_a["hash"], tx_b["hash"]
    one = block(1, GENESIS)
    two = block(2, one.hash, pending(0, at=1.0))
    three = block(3, two.hash)
    four = block(4, three.hash)
    config = MempoolConfig(poll_interval=0.02, snapshot_interval=0.1, reconcile_interval=0.05,
                           drop_grace=0.2)

    run_until_tracked(collector(Pool(tx_a, tx_b), EmbeddedBus(), tmp_path, config), 2,
                      "A and B", backfill=[one])
    state = json.loads((tmp_path / "mempool-1-n.json").read_text())
    assert (state["head_number"], saved(tmp_path)) == (1, [a, b])

    bus = EmbeddedBus()
    consumer = bus.consumer([Topics().mempool], "test")
    node = ChainPool(blocks=[one, two, three, four])  # A mined in 2, B left the pool
    # the block collector's checkpoint was at block 3: it goes on with block 4
    run_until_tracked(collector(node, bus, tmp_path, config), 0,
                      "B dropped", backfill=[four])
    records = [decode(m.value) for m in consumer.poll(0.01, 1000)]
    assert sorted(fates(records)) == [("dropped", b), ("included", a)]
    [included] = [r for r in records if r.type == "tx_lifecycle" and r.fate == "included"]
    assert (included.block_number, included.block_hash) == (2, two.hash)
    assert node.fetched == [2, 3], "from the saved head up to what the block collector gave"
    state = json.loads((tmp_path / "mempool-1-n.json").read_text())  # the clean stop's save
    assert (state["head_number"], state["pending"]) == (4, [])


def test_a_state_older_than_the_refetch_limit_fetches_the_limit_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """A state 7 blocks old, a limit of 3: 3 blocks fetched again and one warning; a failed
    fetch is counted and retried without moving the limit."""
    from chainwatch.exceptions import RpcError
    from collector import mempool_service

    monkeypatch.setattr(mempool_service, "MAX_REFETCH_BLOCKS", 3)
    chain = [block(1, GENESIS)]
    for number in range(2, 9):
        chain.append(block(number, chain[-1].hash))
    tx_a = raw_tx(0)
    run_until_tracked(collector(Pool(tx_a), EmbeddedBus(), tmp_path), 1, "A",
                      backfill=chain[:1])

    class Flaky(ChainPool):
        async def block_by_number(self, number: int) -> Any:
            if number == 3 and 3 not in self.fetched:
                self.fetched.append(3)
                raise RpcError("eth_getBlockByNumber timed out")
            return await super().block_by_number(number)

    node = Flaky(blocks=chain)  # A left the pool; the node is 7 blocks further
    metrics = Metrics()
    quick = MempoolConfig(poll_interval=0.02, reconcile_interval=0.05, drop_grace=0.2)
    with caplog.at_level(logging.WARNING, logger="chainwatch.collector.mempool"):
        # the block collector goes on from block 5 (its checkpoint was at 4)
        run_until_tracked(collector(node, EmbeddedBus(), tmp_path, quick, metrics),
                          0, "A dropped", backfill=chain[4:])
    assert node.fetched == [2, 3, 3, 4]
    warnings = [r.error for r in caplog.records if r.levelno >= logging.WARNING]  # type: ignore[attr-defined]
    assert warnings[-1] == ("the mempool state is 7 blocks old; only 3 fetched again: "
                            "restored txs mined later may be reported dropped")
    assert metrics.registry.get_sample_value(
        "chainwatch_collector_errors_total", {"node": "n", "kind": "rpc"}) == 1


def test_a_state_saved_before_it_had_a_head_restores_without_fetching_blocks():
    data = roundtrip(tracking(pending(0)))
    data.pop("head_number")
    tracker = MempoolTracker(1, "n")
    assert tracker.restore(data, now=10.0) == []
    assert (tracker.tracked_count, tracker.restored_head) == (1, None)


def test_a_tx_gone_from_the_pool_is_not_dropped_while_its_block_is_still_on_the_way(
    tmp_path: Path,
):
    """The listing no longer holds A because the node mined it, but the block collector
    has not delivered that block yet (its view of the node's head is a poll old): even
    with no grace at all, A waits for the block and is included, not dropped."""
    tx_a = raw_tx(0)
    node, bus = Pool(tx_a), EmbeddedBus()
    consumer = bus.consumer([Topics().mempool], "test")
    no_grace = MempoolConfig(poll_interval=0.02, snapshot_interval=0.1,
                             reconcile_interval=0.02, drop_grace=0.0)
    mempool = collector(node, bus, tmp_path, no_grace)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mempool.run(stop))
        await until(lambda: mempool.tracker and mempool.tracker.tracked_count == 1, "A")
        node.txs, node.head = [], 1  # mined in block 1, which is not delivered yet
        await asyncio.sleep(0.3)  # ~15 listings without A
        assert mempool.tracker and mempool.tracker.tracked_count == 1, "A dropped"
        mempool.on_chain([block(1, GENESIS, pending(0, at=1.0))])
        await until(lambda: mempool.tracker and mempool.tracker.tracked_count == 0, "A gone")
        stop.set()
        await task

    asyncio.run(main())
    records = [decode(m.value) for m in consumer.poll(0.01, 1000)]
    assert fates(records) == [("included", tx_a["hash"])]


@pytest.mark.parametrize("content", ["{not json", '{"refs": []}', '{"pending": 1}',
                                     '{"format": "chainwatch.mempool", "version": 99}'])
def test_an_unreadable_state_file_is_a_fresh_start_with_one_warning_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
):
    (tmp_path / "mempool-1-n.json").write_text(content)
    metrics = Metrics()
    tx_a = raw_tx(0)
    mempool = collector(Pool(tx_a), EmbeddedBus(), tmp_path, metrics=metrics)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mempool.run(stop))
        await until(lambda: saved(tmp_path) == [tx_a["hash"]], "a fresh state saved")
        stop.set()
        await task

    with caplog.at_level(logging.WARNING, logger="chainwatch.collector.mempool"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["mempool state ignored, starting fresh"]
    assert "\n" not in warnings[0].error  # type: ignore[attr-defined]
    assert metrics.registry.get_sample_value(
        "chainwatch_collector_errors_total", {"node": "n", "kind": "malformed"}) == 1


def test_the_state_file_is_per_chain_and_node_with_a_safe_name(tmp_path: Path):
    store = FileCheckpointStore(tmp_path, prefix="mempool")
    assert store.path(1, "eu/geth:1").name == "mempool-1-eu_geth_1.json"
    tracker = tracking(pending(0))
    store.save(1, "n", tracker.export())
    assert store.read(1, "n") == roundtrip(tracker)
    assert store.read(2, "n") is None
    assert not list(tmp_path.glob(".ckpt-*")), "no temporary file left"


def _copy_state(source: Path, target: Path) -> None:
    """The state dir as a kill -9 would have left it (files only)."""
    import shutil

    for path in target.iterdir():
        path.unlink()
    for path in source.iterdir():
        shutil.copy2(path, target / path.name)


def test_after_a_kill_a_tx_announced_since_the_last_save_is_tracked_from_the_journal(
    tmp_path: Path,
):
    """A saved; B announced and acknowledged, then killed before the next save. B is mined
    while the collector is down: without the journal the restarted collector does not know
    B, and B never gets a fate record."""
    tx_a, tx_b = raw_tx(0), raw_tx(0, sender=SENDER_B)
    a, b = tx_a["hash"], tx_b["hash"]
    state_dir, killed = tmp_path / "state", tmp_path / "killed"
    state_dir.mkdir()
    killed.mkdir()
    config = MempoolConfig(poll_interval=0.02, snapshot_interval=0.1, reconcile_interval=0.05,
                           drop_grace=0.2, save_interval=3600)  # one save: the first
    rpc, bus = Pool(tx_a), EmbeddedBus()
    mempool = collector(rpc, bus, state_dir, config)
    journal = state_dir / "mempool-1-n.journal.2"  # 1 before the first save, 2 after it

    async def first_run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mempool.run(stop))
        await until(lambda: saved(state_dir) == [a], "A saved")
        rpc.txs = [tx_a, tx_b]
        await until(lambda: journal.exists() and b in journal.read_text(), "B journaled")
        _copy_state(state_dir, killed)  # the kill -9: no save after B
        stop.set()
        await task

    asyncio.run(first_run())
    assert json.loads((killed / "mempool-1-n.json").read_text())["journal_from"] == 2
    assert saved(killed) == [a]
    assert saved(state_dir) == [a, b] and not journal.exists(), "a clean stop saves B instead"

    _copy_state(killed, state_dir)
    one = block(1, GENESIS, pending(0, at=1.0), pending(0, sender=SENDER_B, at=1.0))
    bus = EmbeddedBus()
    consumer = bus.consumer([Topics().mempool], "test")
    run_until_tracked(collector(ChainPool(blocks=[one]), bus, state_dir, config), 0,
                      "A and B mined while the collector was down")
    records = [decode(m.value) for m in consumer.poll(0.01, 1000)]
    assert sorted(fates(records)) == sorted([("included", a), ("included", b)])
    assert not [r for r in records if r.type == "pending_tx"], "B is not announced twice"
    state = json.loads((state_dir / "mempool-1-n.json").read_text())
    assert state["pending"] == [] and state["journal_from"] >= 2
    assert [p.name for p in state_dir.glob("*.journal.*")] in ([], [f"mempool-1-n.journal."
                                                                   f"{state['journal_from']}"])


def test_a_journal_line_cut_short_by_a_kill_is_a_counted_skip(tmp_path: Path):
    from collector.checkpoint import JournalStore

    tx = pending(0, at=1.0)
    JournalStore(tmp_path).append(1, "n", 3, [tx.model_dump_json().encode(), b'{"schema_ver'])
    metrics = Metrics()
    mempool = collector(Pool(), EmbeddedBus(), tmp_path, FAST, metrics)
    tracker = mempool._start_tracker(1)
    assert tracker.tracked() == (tx,)
    assert metrics.collector_errors.labels("n", "malformed")._value.get() == 1
    assert mempool._journal_generation == 4, "appends go to a new generation"
