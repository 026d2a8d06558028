"""Pending transactions followed to their fate (pure tracker, no node)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainwatch.exceptions import MalformedRpcPayload
from chainwatch.schema import Block, PendingTx, Reorg, TxLifecycle, TxSummary
from collector.mappers import map_transaction
from collector.mempool import (
    MempoolTracker,
    map_pending_tx,
    parse_txpool_content,
    parse_txpool_status,
)
from tests.fakes import make_block

RPC_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rpc"  # from ../shared
SENDER = "0x" + "aa" * 20
GENESIS = "0x" + "00" * 32
GWEI = 10**9


def raw_tx(nonce: int, tip: int = 1, sender: str = SENDER, tag: str = "", **changes) -> dict:
    """An EIP-1559 pending tx as txpool_content lists it (hex strings)."""
    tx = {
        "hash": "0x" + f"{int(sender, 16) % 65536:04x}{nonce:04x}{tip:04x}{tag}".ljust(64, "0"),
        "from": sender, "to": "0x" + "bb" * 20, "nonce": hex(nonce), "value": "0x1",
        "gas": "0x5208", "maxPriorityFeePerGas": hex(tip), "maxFeePerGas": hex(tip * 10),
        "gasPrice": hex(tip * 10), "type": "0x2", "input": "0xa9059cbb" + "00" * 64,
    }
    tx.update(changes)
    return tx


def pending(nonce: int, tip: int = 1, at: float = 1.0, **kw) -> PendingTx:
    return map_pending_tx(raw_tx(nonce, tip, **kw), chain_id=1, node="n", first_seen_at=at)


def summary(tx: PendingTx | dict, index: int = 0) -> TxSummary:
    """The tx as a delivered block carries it."""
    if isinstance(tx, dict):
        return map_transaction(tx)
    return TxSummary(hash=tx.hash, transaction_index=index, from_address=tx.from_address,
                     to_address=tx.to_address, value=tx.value, gas=tx.gas, nonce=tx.nonce,
                     gas_price=tx.gas_price, max_fee_per_gas=tx.max_fee_per_gas,
                     max_priority_fee_per_gas=tx.max_priority_fee_per_gas,
                     input_size=tx.input_size, method_id=tx.method_id,
                     is_contract_creation=tx.is_contract_creation)


def block(number: int, parent: str, *txs: PendingTx | dict, branch: str = "a",
          observed_at: float | None = None) -> Block:
    base = make_block(number, parent, branch)
    return base.model_copy(update={
        "transactions": tuple(summary(t, i) for i, t in enumerate(txs)),
        "tx_count": len(txs),
        "observed_at": observed_at if observed_at is not None else base.observed_at,
    })


def reorg(dropped: list[Block], new_head: Block) -> Reorg:
    old_head = dropped[-1]
    return Reorg(chain_id=1, node="n", observed_at=new_head.observed_at,
                 event_id=Reorg.id_for(1, "n", old_head.hash, new_head.hash),
                 old_head_number=old_head.number, old_head_hash=old_head.hash,
                 new_head_number=new_head.number, new_head_hash=new_head.hash,
                 common_ancestor_number=dropped[0].number - 1,
                 common_ancestor_hash=dropped[0].parent_hash, depth=len(dropped),
                 dropped_block_hashes=tuple(b.hash for b in dropped))


def fates(records) -> list[tuple[str, str]]:
    return [(r.fate, r.hash) for r in records if isinstance(r, TxLifecycle)]


def tracking(*txs: PendingTx, **kw) -> MempoolTracker:
    tracker = MempoolTracker(1, "n", **kw)
    for tx in txs:
        tracker.on_pending(tx)
    return tracker


# --- map_pending_tx --------------------------------------------------------------------


def test_a_hex_pending_tx_maps_to_a_record():
    tx = map_pending_tx(raw_tx(3, 7, sender="0x" + "AB" * 20), chain_id=5, node="n",
                        first_seen_at=100.0)
    assert (tx.nonce, tx.max_priority_fee_per_gas, tx.max_fee_per_gas, tx.gas_price) == (
        3, 7, 70, 70)
    assert (tx.gas, tx.value, tx.tx_type) == (21000, 1, 2)
    assert tx.method_id == "0xa9059cbb" and tx.input_size == 68
    assert tx.from_address == "0x" + "ab" * 20  # checksummed or not, one spelling
    assert (tx.first_seen_at, tx.observed_at) == (100.0, 100.0)
    assert tx.event_id == PendingTx.id_for(5, "n", tx.hash)


class HexOnly:
    """A HexBytes look-alike that is not bytes: `.hex()` without the 0x prefix."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def hex(self) -> str:
        return self.data.hex()


def test_web3_formatted_subscription_payload_maps_like_the_hex_one():
    hexed = raw_tx(3, 7)
    web3_like = {**hexed, "hash": bytes.fromhex(hexed["hash"][2:]), "nonce": 3, "gas": 21000,
                 "value": 1, "maxPriorityFeePerGas": 7, "maxFeePerGas": 70, "gasPrice": 70,
                 "type": 2, "input": HexOnly(bytes.fromhex(hexed["input"][2:])),
                 "from": "0x" + "AA" * 20, "to": "0x" + "BB" * 20}
    expected = map_pending_tx(hexed, chain_id=1, node="n", first_seen_at=9.0)
    assert map_pending_tx(web3_like, chain_id=1, node="n", first_seen_at=9.0) == expected


@pytest.mark.parametrize("to", [None, "", "0x"])
def test_a_contract_creation_has_no_recipient(to):
    tx = map_pending_tx(raw_tx(1, to=to, input="0x6080"), chain_id=1, node="n",
                        first_seen_at=1.0)
    assert tx.is_contract_creation and tx.to_address is None and tx.method_id is None


def _real_txs() -> list[dict]:
    path = RPC_FIXTURES / "eth_getBlockByNumber_0x76250_true.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text())["result"]["transactions"]


REAL_TXS = _real_txs()


@pytest.mark.skipif(not REAL_TXS, reason="RPC fixtures not found")
def test_real_mainnet_transactions_map_like_the_block_mapper_does():
    for raw in REAL_TXS:
        tx = map_pending_tx(raw, chain_id=1, node="n", first_seen_at=1.0)
        mined = map_transaction(raw)
        assert tx.model_dump(include=set(TxSummary.model_fields) - {"transaction_index"}) == (
            mined.model_dump(exclude={"transaction_index"}))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"hash": None}, "missing field hash"),
        ({"hash": "0x" + "zz" * 32}, "hash is not hex"),
        ({"hash": "0x1234"}, "hash is not hex"),
        ({"hash": 1.5}, "hash is not hex"),  # floats have a .hex() method too
        ({"from": 5}, "from is not hex"),
        ({"to": "0x" + "bb" * 19}, "to is not hex"),
        ({"input": "0xa9059cbb0"}, "input is not hex"),  # odd length: not bytes
        ({"input": None}, "missing field input"),
        ({"nonce": None}, "nonce"),
        ({"value": None}, "value"),
        ({"gas": True}, "bool"),
        ({"maxFeePerGas": "12"}, "hex quantity"),
        ({"type": "0xq"}, "type"),
    ],
)
def test_malformed_pending_txs_raise_a_one_line_reason(change, why):
    with pytest.raises(MalformedRpcPayload, match=why):
        map_pending_tx({**raw_tx(1), **change}, chain_id=1, node="n", first_seen_at=1.0)


def test_a_pending_tx_that_is_not_an_object_is_malformed():
    with pytest.raises(MalformedRpcPayload, match="expected an object"):
        map_pending_tx("0x" + "ab" * 32, chain_id=1, node="n", first_seen_at=1.0)


class BrokenHex:
    def hex(self) -> str:
        raise RuntimeError("boom")


LEAVES = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=40) | st.just(BrokenHex())
    | st.builds(HexOnly, st.binary(max_size=40))
    | st.sampled_from(["0x", "0x0", "0X1f", "0xzz", "0x-1", "0x" + "ab" * 32, "0x" + "cd" * 20])
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_tx(draw):
    base = copy.deepcopy(draw(st.sampled_from(REAL_TXS))) if REAL_TXS and draw(
        st.booleans()) else raw_tx(1, 1)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(base)))
        if draw(st.booleans()):
            base.pop(key, None)
        else:
            base[key] = draw(JSON_VALUES)
    return base


@settings(max_examples=400, deadline=None)
@given(st.one_of(JSON_VALUES, mutated_tx()), st.floats(allow_nan=True))
def test_map_pending_tx_gives_a_record_or_malformed_payload_and_nothing_else(raw, seen_at):
    try:
        tx = map_pending_tx(raw, chain_id=1, node="n", first_seen_at=seen_at)
    except MalformedRpcPayload as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(tx, PendingTx)


# --- txpool ----------------------------------------------------------------------------


def test_txpool_content_lists_pending_and_queued_txs():
    other = "0x" + "cc" * 20
    content = {"pending": {SENDER: {"0": raw_tx(0), "1": raw_tx(1)}, other: {"7": raw_tx(7)}},
               "queued": {SENDER: {"5": raw_tx(5)}}}
    pending_txs, queued = parse_txpool_content(content)
    assert sorted(t["nonce"] for t in pending_txs) == ["0x0", "0x1", "0x7"]
    assert [t["nonce"] for t in queued] == ["0x5"]
    assert parse_txpool_content({"pending": {}, "queued": None}) == ([], [])


@pytest.mark.parametrize("bad", [None, [], {"pending": []}, {"pending": {SENDER: []}},
                                 {"queued": {SENDER: {"0": "0xab"}}}])
def test_malformed_txpool_content_is_a_typed_error(bad):
    with pytest.raises(MalformedRpcPayload, match="txpool_content"):
        parse_txpool_content(bad)


def test_txpool_status_counts():
    assert parse_txpool_status({"pending": "0x10", "queued": "0x2"}) == (16, 2)
    for bad in (None, {"pending": "0x1"}, {"pending": "ten", "queued": "0x0"}):
        with pytest.raises(MalformedRpcPayload):
            parse_txpool_status(bad)


# --- announcements ---------------------------------------------------------------------


def test_a_new_tx_is_tracked_and_published_once():
    tx = pending(0)
    tracker = MempoolTracker(1, "n")
    assert tracker.on_pending(tx) == [tx]
    assert tracker.on_pending(tx) == []  # the subscription and a txpool poll both saw it
    assert tracker.tracked_count == 1


def test_same_sender_and_nonce_with_a_new_hash_is_a_replacement_with_its_fee_bump():
    old, new = pending(4, tip=10, at=1.0), pending(4, tip=25, at=2.0)
    tracker = tracking(old)
    out = tracker.on_pending(new)
    assert fates(out) == [("replaced", old.hash)] and out[1] == new
    assert isinstance(out[0], TxLifecycle)
    assert out[0].replaced_by == new.hash and out[0].fee_bump_ratio == pytest.approx(2.5)
    assert out[0].observed_at == 2.0
    assert tracker.tracked_count == 1 and tracker.replaced == 1
    assert fates(tracker.on_pool_contents({new.hash}, now=1000.0)) == []  # old is untracked


def test_the_fee_bump_compares_like_with_like():
    """A legacy tx replacing an EIP-1559 one: gas price against gas price, never a
    priority fee against a gas price."""
    old = pending(4, tip=GWEI)  # priority 1 gwei, gasPrice (max fee) 10 gwei
    legacy = map_pending_tx(raw_tx(4, tag="1", maxPriorityFeePerGas=None, maxFeePerGas=None,
                                   gasPrice=hex(11 * GWEI), type="0x0"),
                            chain_id=1, node="n", first_seen_at=2.0)
    [replaced, _] = tracking(old).on_pending(legacy)
    assert isinstance(replaced, TxLifecycle)
    assert replaced.fee_bump_ratio == pytest.approx(1.1)


def test_no_fee_bump_ratio_when_the_old_fee_is_zero_or_unknown():
    zero = pending(4, tip=0)
    [replaced, _] = tracking(zero).on_pending(pending(4, tip=5))
    assert isinstance(replaced, TxLifecycle)
    assert replaced.fate == "replaced" and replaced.fee_bump_ratio is None
    bare = map_pending_tx(raw_tx(5, maxPriorityFeePerGas=None, maxFeePerGas=None,
                                 gasPrice=None), chain_id=1, node="n", first_seen_at=1.0)
    [replaced, _] = tracking(bare).on_pending(pending(5, tip=5))
    assert isinstance(replaced, TxLifecycle)
    assert replaced.fee_bump_ratio is None


# --- inclusion -------------------------------------------------------------------------


def test_included_with_the_delay_from_first_seen_to_the_block():
    tx, other = pending(0, at=100.0), pending(1, at=100.0)
    tracker = tracking(tx, other)
    mined = block(5, GENESIS, tx, observed_at=112.5)
    [included] = tracker.on_blocks([mined], now=113.0)
    assert (included.fate, included.hash, included.block_number, included.block_hash) == (
        "included", tx.hash, 5, mined.hash)
    assert included.inclusion_delay_seconds == pytest.approx(12.5)
    assert included.observed_at == 113.0
    assert included.event_id == TxLifecycle.id_for(1, "n", tx.hash, "included", mined.hash)
    assert (tracker.tracked_count, tracker.included) == (1, 1)


def test_the_inclusion_delay_is_never_negative():
    tx = pending(0, at=200.0)  # the block arrived before the announcement was processed
    [included] = tracking(tx).on_blocks([block(5, GENESIS, tx, observed_at=199.0)], now=201)
    assert included.inclusion_delay_seconds == 0.0


def test_a_different_tx_mined_in_the_same_slot_replaces_the_tracked_one():
    seen = pending(2, tip=10)
    private = raw_tx(2, tip=30, tag="ff")  # never seen pending (private order flow)
    tracker = tracking(seen)
    [replaced] = tracker.on_blocks([block(1, GENESIS, private)], now=5.0)
    assert (replaced.fate, replaced.hash, replaced.replaced_by) == (
        "replaced", seen.hash, private["hash"])
    assert replaced.fee_bump_ratio == pytest.approx(3.0)
    assert tracker.tracked_count == 0 and tracker.replaced == 1


def test_a_stale_pool_listing_does_not_bring_back_an_included_tx():
    """A txpool_content reply can be older than the block the collector just delivered."""
    tx = pending(0, at=1.0)
    tracker = tracking(tx)
    tracker.on_blocks([block(1, GENESIS, tx)], now=10.0)
    assert tracker.on_pending(pending(0, at=10.0)) == []
    assert fates(tracker.expire(now=1e6)) == []  # nothing left to drop later


# --- drops -----------------------------------------------------------------------------


def test_dropped_when_absent_from_the_pool_for_the_grace_period():
    young, old, kept = pending(0, at=100.0), pending(1, at=50.0), pending(2, at=50.0)
    tracker = tracking(young, old, kept, grace_seconds=30)
    assert fates(tracker.on_pool_contents({kept.hash}, now=110.0)) == []  # first miss
    out = tracker.on_pool_contents({kept.hash}, now=140.0)
    assert fates(out) == [("dropped", young.hash), ("dropped", old.hash)]
    assert out[0].block_hash is None and out[0].observed_at == 140.0
    assert tracker.dropped == 2 and tracker.tracked_count == 1


def test_a_young_tx_is_not_dropped_by_a_listing_taken_before_it_arrived():
    tx = pending(0, at=100.0)
    tracker = tracking(tx, grace_seconds=0)
    assert fates(tracker.on_pool_contents(set(), now=100.0)) == []
    assert fates(tracker.on_pool_contents(set(), now=100.5)) == [("dropped", tx.hash)]


def test_a_tx_mined_before_its_block_is_delivered_is_included_not_dropped():
    """The pool poll can see a block's effect before the block collector delivers it."""
    tx = pending(0, at=0.0)
    tracker = tracking(tx, grace_seconds=30)
    assert tracker.on_pool_contents(set(), now=100.0) == []
    assert fates(tracker.on_blocks([block(3, GENESIS, tx)], now=101.0)) == [
        ("included", tx.hash)]
    assert tracker.dropped == 0


def test_a_tx_back_in_the_pool_starts_its_absence_again():
    tx = pending(0, at=0.0)
    tracker = tracking(tx, grace_seconds=30)
    tracker.on_pool_contents(set(), now=100.0)
    tracker.on_pool_contents({tx.hash}, now=110.0)
    assert tracker.on_pool_contents(set(), now=131.0) == []  # absent 0 s, not 31 s
    assert fates(tracker.on_pool_contents(set(), now=161.0)) == [("dropped", tx.hash)]


def test_expired_when_tracked_longer_than_drop_after_seconds():
    old, young = pending(0, at=0.0), pending(1, at=3000.0)
    tracker = tracking(old, young, drop_after_seconds=3600)
    assert tracker.expire(now=3600.0) == []
    assert fates(tracker.expire(now=3600.5)) == [("dropped", old.hash)]
    assert tracker.dropped == 1 and tracker.tracked_count == 1


# --- reorgs ----------------------------------------------------------------------------


def test_requeued_after_a_reorg_unless_the_new_branch_includes_it_again():
    a, b = pending(0, at=1.0), pending(1, at=1.0)
    tracker = tracking(a, b)
    old = block(7, GENESIS, a, b, branch="old", observed_at=10.0)
    tracker.on_blocks([old], now=10.0)
    new = block(7, GENESIS, b, branch="new", observed_at=20.0)
    out = tracker.on_blocks([reorg([old], new), new], now=20.0)
    assert fates(out) == [("requeued", a.hash)]
    assert (out[0].block_hash, out[0].block_number) == (old.hash, 7)
    assert (tracker.tracked_count, tracker.requeued, tracker.included) == (1, 1, 2)
    [again] = tracker.on_blocks([block(8, new.hash, a, observed_at=30.0)], now=30.0)
    assert again.fate == "included"
    assert again.inclusion_delay_seconds == pytest.approx(29.0)  # first_seen_at kept


def test_a_block_dropped_in_the_same_delivery_requeues_its_txs():
    """The follower can deliver block 8, then a reorg that drops it, in one batch."""
    tx = pending(0, at=1.0)
    tracker = tracking(tx)
    b7 = block(7, GENESIS)
    tracker.on_blocks([b7], now=5.0)
    b8 = block(8, b7.hash, tx)
    b8x = block(8, b7.hash, branch="x")
    out = tracker.on_blocks([b8, reorg([b8], b8x), b8x], now=9.0)
    assert fates(out) == [("included", tx.hash), ("requeued", tx.hash)]
    assert out[1].block_hash == b8.hash and tracker.tracked_count == 1


def test_a_tx_reincluded_by_a_reorg_is_requeued_when_that_branch_goes_too():
    tx = pending(0, at=1.0)
    tracker = tracking(tx)
    first = block(5, GENESIS, tx, branch="a")
    tracker.on_blocks([first], now=2.0)
    second = block(5, GENESIS, tx, branch="b")
    assert tracker.on_blocks([reorg([first], second), second], now=3.0) == []
    third = block(5, GENESIS, branch="c")
    out = tracker.on_blocks([reorg([second], third), third], now=4.0)
    assert fates(out) == [("requeued", tx.hash)] and out[0].block_hash == second.hash


def test_a_dropped_tx_whose_nonce_the_new_branch_used_is_replaced_not_requeued():
    tx = pending(3, tip=2, at=1.0)
    tracker = tracking(tx)
    old = block(5, GENESIS, tx, branch="old")
    tracker.on_blocks([old], now=2.0)
    rival = raw_tx(3, tip=4, tag="9")
    new = block(5, GENESIS, rival, branch="new")
    out = tracker.on_blocks([reorg([old], new), new], now=3.0)
    assert fates(out) == [("replaced", tx.hash)] and out[0].replaced_by == rival["hash"]
    assert out[0].fee_bump_ratio == pytest.approx(2.0)
    assert tracker.tracked_count == 0 and tracker.requeued == 0


def test_txs_never_seen_pending_are_not_requeued_but_may_be_announced_again():
    stranger = raw_tx(9, tag="5")
    tracker = MempoolTracker(1, "n")
    old = block(5, GENESIS, stranger, branch="old")
    tracker.on_blocks([old], now=1.0)
    assert tracker.on_pending(pending(9, tag="5", at=1.5)) == []  # stale: it is mined
    new = block(5, GENESIS, branch="new")
    assert tracker.on_blocks([reorg([old], new), new], now=2.0) == []
    again = pending(9, tag="5", at=3.0)  # back in the node's pool after the reorg
    assert tracker.on_pending(again) == [again]


def test_a_block_delivered_twice_still_requeues_after_a_reorg():
    tx = pending(0, at=1.0)
    tracker = tracking(tx)
    mined = block(5, GENESIS, tx)
    tracker.on_blocks([mined], now=2.0)
    assert tracker.on_blocks([mined], now=2.5) == []
    new = block(5, GENESIS, branch="new")
    out = tracker.on_blocks([reorg([mined], new), new], now=3.0)
    assert fates(out) == [("requeued", tx.hash)] and tracker.included == 1


def test_only_the_last_blocks_are_remembered_for_reorgs():
    txs = [pending(i, at=1.0) for i in range(3)]
    tracker = tracking(*txs, remember_blocks=2)
    chain = [block(1, GENESIS, txs[0])]
    chain.append(block(2, chain[-1].hash, txs[1]))
    chain.append(block(3, chain[-1].hash, txs[2]))
    tracker.on_blocks(chain, now=2.0)
    new = block(1, GENESIS, branch="new")
    out = tracker.on_blocks([reorg(chain, new), new], now=3.0)
    assert fates(out) == [("requeued", txs[1].hash), ("requeued", txs[2].hash)]


# --- memory and summary ----------------------------------------------------------------


def test_when_full_the_oldest_tx_is_evicted_and_counted():
    txs = [pending(nonce, at=float(nonce)) for nonce in range(5)]
    tracker = tracking(*txs, max_tracked=3)
    assert (tracker.tracked_count, tracker.evicted) == (3, 2)
    out = tracker.on_blocks([block(1, GENESIS, txs[0], txs[4])], now=9.0)
    assert fates(out) == [("included", txs[4].hash)]  # txs[0] was no longer followed


def test_snapshot_counts_senders_and_nearest_rank_fee_percentiles():
    tracker = MempoolTracker(1, "n")
    for i, tip in enumerate([1, 2, 3, 4, 100]):
        tracker.on_pending(pending(i, tip, sender="0x" + f"{i % 2:02x}" * 20))
    legacy = map_pending_tx(raw_tx(9, maxPriorityFeePerGas=None, maxFeePerGas=None,
                                   gasPrice="0x5", type="0x0"),
                            chain_id=1, node="n", first_seen_at=1.0)
    tracker.on_pending(legacy)  # bids its gas price: 5
    snap = tracker.snapshot(now=5.0, pending_count=None, queued_count=7, source="txpool")
    assert (snap.pending_count, snap.queued_count, snap.tracked_count) == (6, 7, 6)
    assert snap.sender_count == 3
    # sorted tips 1 2 3 4 5 100: p50 = 3rd, p90 = 6th (ceil 5.4), p99 = 6th
    assert (snap.priority_fee_p50, snap.priority_fee_p90, snap.priority_fee_p99) == (3, 100, 100)
    assert snap.max_fee_p50 == 30  # of 10 20 30 40 1000
    assert (snap.source, snap.observed_at) == ("txpool", 5.0)
    assert snap.event_id != tracker.snapshot(6.0, None, None, "txpool").event_id


def test_nearest_rank_at_exact_boundaries():
    tracker = tracking(*(pending(i, tip=i + 1) for i in range(100)))
    snap = tracker.snapshot(now=1.0, pending_count=1234, queued_count=None,
                            source="subscription")
    assert (snap.priority_fee_p50, snap.priority_fee_p90, snap.priority_fee_p99) == (50, 90, 99)
    assert (snap.pending_count, snap.queued_count) == (1234, None)


def test_an_empty_pool_has_no_fee_levels_and_a_bad_source_is_refused():
    snap = MempoolTracker(1, "n").snapshot(now=1.0, pending_count=None, queued_count=None,
                                           source="subscription")
    assert (snap.pending_count, snap.sender_count, snap.priority_fee_p50) == (0, 0, None)
    with pytest.raises(ValueError, match="source"):
        MempoolTracker(1, "n").snapshot(now=1.0, pending_count=0, queued_count=0, source="ws")
