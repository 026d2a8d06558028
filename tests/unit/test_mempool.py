"""Pending transactions followed to their fate (pure tracker, no node)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainwatch.exceptions import MalformedRpcPayload
from chainwatch.schema import Block, PendingTx, Reorg, TxLifecycle, TxSummary
from collector.mempool import (
    MempoolTracker,
    map_pending_tx,
    parse_txpool_content,
    parse_txpool_status,
)
from tests.fakes import make_block

SENDER = "0x" + "aa" * 20


def raw_tx(nonce: int, tip: int, sender: str = SENDER, tag: str = "") -> dict:
    return {
        "hash": "0x" + f"{nonce:04x}{tip:04x}{tag}".ljust(64, "0"),
        "from": sender, "to": "0x" + "bb" * 20, "nonce": hex(nonce), "value": "0x1",
        "gas": "0x5208", "maxPriorityFeePerGas": hex(tip), "maxFeePerGas": hex(tip * 10),
        "type": "0x2", "input": "0xa9059cbb" + "00" * 64,
    }


def pending(nonce: int, tip: int, at: float, **kw) -> PendingTx:
    return map_pending_tx(raw_tx(nonce, tip, **kw), chain_id=1, node="n", first_seen_at=at)


def including(block: Block, *txs: PendingTx, observed_at: float) -> Block:
    summaries = tuple(
        TxSummary(hash=t.hash, transaction_index=i, from_address=t.from_address,
                  to_address=t.to_address, value=t.value, gas=t.gas, nonce=t.nonce,
                  input_size=t.input_size, method_id=t.method_id, is_contract_creation=False)
        for i, t in enumerate(txs)
    )
    return block.model_copy(update={"transactions": summaries, "tx_count": len(summaries),
                                    "observed_at": observed_at})


def fates(records) -> list[tuple[str, str]]:
    return [(r.fate, r.hash) for r in records if isinstance(r, TxLifecycle)]


def test_map_pending_tx_reads_hex_and_web3_formatted_payloads():
    tx = pending(3, 7, 100.0)
    assert (tx.nonce, tx.max_priority_fee_per_gas, tx.gas, tx.tx_type) == (3, 7, 21000, 2)
    assert tx.method_id == "0xa9059cbb" and tx.input_size == 68
    web3_like = {**raw_tx(3, 7), "hash": bytes.fromhex(raw_tx(3, 7)["hash"][2:]), "nonce": 3,
                 "gas": 21000, "value": 1, "maxPriorityFeePerGas": 7, "maxFeePerGas": 70,
                 "type": 2, "input": bytes.fromhex("a9059cbb" + "00" * 64),
                 "from": "0x" + "AA" * 20}
    again = map_pending_tx(web3_like, chain_id=1, node="n", first_seen_at=100.0)
    assert again == tx
    creation = map_pending_tx({**raw_tx(1, 1), "to": None}, chain_id=1, node="n",
                              first_seen_at=1.0)
    assert creation.is_contract_creation and creation.to_address is None


def test_included_with_the_delay_from_first_seen():
    tracker = MempoolTracker(1, "n")
    tx = pending(0, 1, at=100.0)
    assert tracker.on_pending(tx) == [tx]
    assert tracker.on_pending(tx) == []  # announced twice: one record
    block = including(make_block(5, "0x" + "00" * 32), tx, observed_at=112.5)
    [included] = tracker.on_blocks([block], now=113.0)
    assert (included.fate, included.block_number, included.block_hash) == (
        "included", 5, block.hash)
    assert included.inclusion_delay_seconds == pytest.approx(12.5)
    assert tracker.tracked_count == 0 and tracker.included == 1


def test_same_sender_and_nonce_with_a_new_hash_is_a_replacement_with_its_fee_bump():
    tracker = MempoolTracker(1, "n")
    old, new = pending(4, 10, at=1.0), pending(4, 25, at=2.0)
    tracker.on_pending(old)
    out = tracker.on_pending(new)
    assert isinstance(out[0], TxLifecycle) and out[1] == new
    assert (out[0].fate, out[0].hash, out[0].replaced_by) == ("replaced", old.hash, new.hash)
    assert out[0].fee_bump_ratio == pytest.approx(2.5)
    assert tracker.tracked_count == 1 and tracker.replaced == 1


def test_a_different_tx_mined_in_the_same_slot_replaces_the_tracked_one():
    tracker = MempoolTracker(1, "n")
    seen = pending(2, 1, at=1.0)
    tracker.on_pending(seen)
    other = pending(2, 9, at=1.0, tag="ff")  # never seen pending (private flow)
    block = including(make_block(1, "0x" + "00" * 32), other, observed_at=5.0)
    [replaced] = tracker.on_blocks([block], now=5.0)
    assert (replaced.fate, replaced.hash, replaced.replaced_by) == ("replaced", seen.hash,
                                                                    other.hash)


def test_dropped_when_gone_from_the_pool_after_the_grace_period_or_too_old():
    tracker = MempoolTracker(1, "n", grace_seconds=30, drop_after_seconds=3600)
    young, old, kept = pending(0, 1, at=100.0), pending(1, 1, at=50.0), pending(2, 1, at=50.0)
    for tx in (young, old, kept):
        tracker.on_pending(tx)
    out = tracker.on_pool_contents({kept.hash}, now=110.0)
    assert fates(out) == [("dropped", old.hash)]  # young is within its grace period
    assert fates(tracker.expire(now=50.0 + 3601)) == [("dropped", kept.hash)]
    assert tracker.dropped == 2 and tracker.tracked_count == 1


def test_requeued_after_a_reorg_unless_the_new_branch_includes_it_again():
    tracker = MempoolTracker(1, "n")
    a, b = pending(0, 1, at=1.0), pending(1, 1, at=1.0)
    tracker.on_pending(a)
    tracker.on_pending(b)
    parent = "0x" + "00" * 32
    old_block = including(make_block(7, parent, "old"), a, b, observed_at=10.0)
    tracker.on_blocks([old_block], now=10.0)
    new_block = including(make_block(7, parent, "new"), b, observed_at=20.0)
    reorg = Reorg(chain_id=1, node="n", event_id="r", observed_at=20.0, old_head_number=7,
                  old_head_hash=old_block.hash, new_head_number=7, new_head_hash=new_block.hash,
                  common_ancestor_number=6, common_ancestor_hash=parent, depth=1,
                  dropped_block_hashes=(old_block.hash,))
    out = tracker.on_blocks([reorg, new_block], now=20.0)
    assert fates(out) == [("requeued", a.hash)]
    assert out[0].block_hash == old_block.hash
    assert tracker.tracked_count == 1  # a is pending again, with its first_seen_at
    [again] = tracker.on_blocks([including(make_block(8, new_block.hash), a, observed_at=30.0)],
                                now=30.0)
    assert again.inclusion_delay_seconds == pytest.approx(29.0)


def test_memory_is_bounded_and_evictions_are_counted():
    tracker = MempoolTracker(1, "n", max_tracked=3)
    for nonce in range(5):
        tracker.on_pending(pending(nonce, 1, at=float(nonce)))
    assert tracker.tracked_count == 3 and tracker.evicted == 2


def test_snapshot_counts_senders_and_fee_percentiles():
    tracker = MempoolTracker(1, "n")
    for i, tip in enumerate([1, 2, 3, 4, 100]):
        tracker.on_pending(pending(i, tip, at=1.0, sender="0x" + f"{i % 2:02x}" * 20))
    snap = tracker.snapshot(now=5.0, pending_count=None, queued_count=7, source="txpool")
    assert (snap.pending_count, snap.queued_count, snap.tracked_count) == (5, 7, 5)
    assert snap.sender_count == 2
    assert (snap.priority_fee_p50, snap.priority_fee_p90, snap.priority_fee_p99) == (3, 100, 100)
    assert snap.max_fee_p50 == 30 and snap.source == "txpool"


def test_txpool_parsing():
    content = {"pending": {SENDER: {"0": raw_tx(0, 1), "1": raw_tx(1, 1)}},
               "queued": {SENDER: {"5": raw_tx(5, 1)}}}
    pending_txs, queued = parse_txpool_content(content)
    assert len(pending_txs) == 2 and len(queued) == 1
    assert parse_txpool_status({"pending": "0x10", "queued": "0x2"}) == (16, 2)
    for bad in (None, [], {"pending": []}, {"pending": {SENDER: []}}):
        with pytest.raises(MalformedRpcPayload):
            parse_txpool_content(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=12)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.builds(
    lambda key, value: {**raw_tx(1, 1), key: value},
    st.sampled_from(list(raw_tx(1, 1))), json_values)))
def test_map_pending_tx_only_ever_raises_malformed_payload(raw):
    try:
        tx = map_pending_tx(raw, chain_id=1, node="n", first_seen_at=1.0)
    except MalformedRpcPayload as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(tx, PendingTx)
