import asyncio

import pytest

from chainwatch.schema import Block, Reorg
from collector.chain import ChainFollower, ChainTracker
from tests.fakes import FakeChain


def follow(chain: FakeChain, tracker: ChainTracker | None = None, **kw) -> ChainFollower:
    return ChainFollower(chain, tracker or ChainTracker(kw.pop("window", 64)), chain_id=1,
                         node="n1", **kw)


def drain(follower: ChainFollower) -> list[Block | Reorg]:
    out: list[Block | Reorg] = []
    while batch := asyncio.run(follower.step()):
        out.extend(batch)
    return out


def numbers(records) -> list[int]:
    return [r.number for r in records if isinstance(r, Block)]


def test_follows_a_growing_chain_block_by_block():
    chain = FakeChain(10)
    f = follow(chain)
    assert numbers(drain(f)) == [9]
    chain.mine(3)
    assert numbers(drain(f)) == [10, 11, 12]
    assert f.tracker.head is not None
    assert f.tracker.head.hash == chain.head.hash


def test_depth_one_reorg_at_equal_height_is_reported_with_its_ancestor():
    chain = FakeChain(12)
    f = follow(chain, start_block=0)
    drain(f)
    old_head = chain.head
    chain.reorg(1)
    records = drain(f)
    reorg = records[0]
    assert isinstance(reorg, Reorg)
    assert (reorg.depth, reorg.common_ancestor_number) == (1, 10)
    assert reorg.old_head_hash == old_head.hash
    assert reorg.dropped_block_hashes == (old_head.hash,)
    assert reorg.new_head_hash == chain.head.hash
    assert numbers(records[1:]) == [11]


def test_reorg_to_a_longer_branch_drops_exactly_the_replaced_blocks():
    chain = FakeChain(20)
    f = follow(chain, start_block=0)
    drain(f)
    dropped = [b.hash for b in chain.canonical[-3:]]
    chain.reorg(3, new_length=5)
    records = drain(f)
    reorg = records[0]
    assert isinstance(reorg, Reorg)
    assert reorg.depth == 3
    assert reorg.common_ancestor_number == 16
    assert list(reorg.dropped_block_hashes) == dropped
    assert numbers(records[1:]) == [17, 18, 19, 20, 21]
    assert f.tracker.head is not None
    assert f.tracker.head.hash == chain.head.hash


def test_switch_back_to_a_shorter_known_chain_is_a_reorg():
    chain = FakeChain(10)
    f = follow(chain, start_block=0)
    drain(f)
    del chain.canonical[8:]  # the node went back to block 7
    records = drain(f)
    assert len(records) == 1 and isinstance(records[0], Reorg)
    assert (records[0].depth, records[0].common_ancestor_number) == (2, 7)


def test_reorg_deeper_than_the_window_is_found_over_rpc():
    chain = FakeChain(30)
    f = follow(chain, window=4, start_block=0)
    drain(f)
    chain.reorg(6)
    records = drain(f)
    reorg = records[0]
    assert isinstance(reorg, Reorg)
    assert reorg.ancestor_found
    assert (reorg.depth, reorg.common_ancestor_number) == (6, 23)
    assert len(reorg.dropped_block_hashes) == 6
    assert numbers(records[1:]) == list(range(24, 30))
    assert f.tracker.head is not None
    assert f.tracker.head.hash == chain.head.hash


def test_reorg_past_the_limit_is_still_reported_without_ancestor():
    chain = FakeChain(60)
    f = follow(chain, window=4, start_block=0, max_reorg_depth=8)
    drain(f)
    chain.reorg(20)
    records = drain(f)
    reorg = records[0]
    assert isinstance(reorg, Reorg)
    assert not reorg.ancestor_found and reorg.common_ancestor_number is None
    assert reorg.depth >= 8
    assert f.tracker.head is not None
    assert f.tracker.head.hash == chain.head.hash  # it still follows the new chain


def test_deep_reorg_when_the_node_forgot_the_old_blocks_is_reported_without_ancestor():
    chain = FakeChain(30)
    chain.forget_side_blocks = True
    f = follow(chain, window=4, start_block=0)
    drain(f)
    chain.reorg(6)
    reorg = drain(f)[0]
    assert isinstance(reorg, Reorg)
    assert not reorg.ancestor_found
    assert reorg.depth >= 4


def test_reorg_across_a_restart_is_detected_from_the_checkpoint():
    chain = FakeChain(15)
    f = follow(chain, start_block=0)
    drain(f)
    saved = f.tracker.snapshot()
    # collector is down: the node reorgs 2 blocks and grows by 5
    chain.reorg(2, new_length=7)
    restarted = follow(chain, ChainTracker.restore(saved))
    records = drain(restarted)
    reorg = records[0]
    assert isinstance(reorg, Reorg)
    assert (reorg.depth, reorg.common_ancestor_number) == (2, 12)
    assert numbers(records[1:]) == list(range(13, 20))


def test_restart_backfills_every_missed_block_in_batches():
    chain = FakeChain(5)
    f = follow(chain, batch_size=100)
    drain(f)
    saved = f.tracker.snapshot()
    chain.mine(250)
    restarted = follow(chain, ChainTracker.restore(saved), batch_size=100)
    sizes = []
    got = []
    while batch := asyncio.run(restarted.step()):
        sizes.append(len(batch))
        got.extend(numbers(batch))
    assert got == list(range(5, 255))
    assert sizes == [100, 100, 50]


def test_tracker_window_is_bounded_and_snapshot_round_trips():
    chain = FakeChain(100)
    f = follow(chain, window=8, start_block=0)
    drain(f)
    assert len(f.tracker.snapshot()) == 8
    again = ChainTracker.restore(f.tracker.snapshot(), window=8)
    assert again.head == f.tracker.head and again.oldest == f.tracker.oldest


def test_tracker_refuses_a_block_that_does_not_extend_it():
    chain = FakeChain(3)
    tracker = ChainTracker()
    tracker.append(chain.canonical[0])
    with pytest.raises(ValueError):
        tracker.append(chain.canonical[2])


def test_reorg_right_after_start_uses_the_parent_hash_of_the_oldest_block():
    chain = FakeChain(11)
    chain.forget_side_blocks = True
    f = follow(chain)  # starts at the head: the tracker holds block 10 only
    drain(f)
    chain.reorg(3)
    reorg = drain(f)[0]
    assert isinstance(reorg, Reorg)
    assert not reorg.ancestor_found
    assert reorg.depth == 2  # a lower bound: block 9 differs, block 8 is unknown


def test_a_block_too_large_for_the_bus_keeps_its_first_transactions_and_says_so():
    from chainwatch.schema import TxSummary, decode
    from collector.service import encode_within

    tx = TxSummary(hash="0x" + "ab" * 32, transaction_index=0, from_address="0x" + "11" * 20,
                   to_address="0x" + "22" * 20, value=10**18, gas=21000, nonce=1,
                   input_size=0, method_id=None, is_contract_creation=False)
    chain = FakeChain(2)
    big = chain.head.model_copy(update={"transactions": (tx,) * 5000, "tx_count": 5000})
    payload = encode_within(big, 100_000)
    assert len(payload) <= 100_000
    small = decode(payload)
    assert isinstance(small, Block)
    assert small.transactions_truncated and small.tx_count == 5000
    assert 0 < len(small.transactions) < 5000
    assert encode_within(chain.head, 100_000) == encode_within(chain.head, 10**9)
