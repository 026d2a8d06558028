"""A batch of many blocks gives the miner window rules' findings of one block at a time.

A live detector polls about one block at a time; replay and a detector catching up on
a backlog hand it hundreds. The window rules (share, surge, empty blocks) must find the
same episodes either way, also when one starts and ends inside a batch.
"""

from __future__ import annotations

import random

import pytest

from chainwatch.schema import Block, Finding, MempoolSnapshot
from detector.families import FamilyConfig, MinerFamily, TxFamily
from detector.rule_heads import (
    SURGE_MARGIN,
    SURGE_MIN_PRIOR,
    _surge_k_min,
    rule_heads,
    window_candidates,
)
from detector.rules import beta_binomial_tail
from tests.fakes import make_block

HONEST = [f"0x{i:02x}" + "ab" * 19 for i in range(12)]
NODE = "n1"


def history(seed: int, blocks: int = 420) -> list[Block | MempoolSnapshot]:
    """A node's blocks and mempool snapshots: a mixed field of producers, broken by
    takeovers (a known or a new producer making most blocks for a while), empty blocks,
    and now and then a height seen twice (a reorg's replacement)."""
    rng = random.Random(seed)
    weights = [rng.uniform(0.2, 3.0) for _ in HONEST]
    out: list[Block | MempoolSnapshot] = []
    parent, number, t = "0x" + "00" * 32, 1, 1_700_000_000.0
    takeover: tuple[str, int] | None = None
    empty_share = rng.choice([0.0, 0.05, 0.3])
    for i in range(blocks):
        if takeover is None and rng.random() < 0.03:
            who = rng.choice([*HONEST[:3], f"0x{seed:04x}" + "cd" * 18 + f"{i:04x}"])
            takeover = (who, rng.randint(3, 70))
        if takeover is not None and rng.random() < 0.85:
            miner = takeover[0]
        else:
            miner = rng.choices(HONEST, weights)[0]
        if takeover is not None:
            takeover = (takeover[0], takeover[1] - 1) if takeover[1] > 1 else None
        t += 12
        if rng.random() < 0.4:  # between the previous block and this one, in time order
            out.append(MempoolSnapshot(
                chain_id=1, node=NODE, event_id=f"s{seed}-{i}", observed_at=t - 5,
                pending_count=rng.choice([5, 30, 200]), tracked_count=0, sender_count=1))
        if number > 2 and rng.random() < 0.02:
            number -= 1  # the same height again, from another branch
        block = make_block(number, parent, branch=f"b{i}", node=NODE, timestamp=int(t),
                           observed_at=t + 1.5,
                           tx_count=0 if rng.random() < empty_share else 150)
        out.append(block.model_copy(update={"miner": miner}))
        parent, number = block.hash, number + 1
    return out


def feed(records: list[Block | MempoolSnapshot], cuts: list[int]) -> list[Finding]:
    """The records through one MinerFamily in batches ending before each cut, as the
    engine hands them over: snapshots first, then the batch's blocks, each with its time."""
    family = MinerFamily(FamilyConfig())
    txs = TxFamily(FamilyConfig(), kind="iforest", seed=1)
    found: list[Finding] = []
    for start, end in zip([0, *cuts], [*cuts, len(records)], strict=True):
        batch = records[start:end]
        for r in batch:
            if isinstance(r, MempoolSnapshot):
                family.on_snapshot(r)
        blocks = [r for r in batch if isinstance(r, Block)]
        if blocks:
            found += family.on_blocks(blocks, txs, blocks[-1].observed_at,
                                      block_nows=[b.observed_at for b in blocks])
    return found


def per_block_cuts(records: list[Block | MempoolSnapshot]) -> list[int]:
    return [i + 1 for i, r in enumerate(records[:-1]) if isinstance(r, Block)]


@pytest.mark.parametrize("seed", range(12))
def test_batches_of_any_size_find_what_one_block_at_a_time_finds(seed: int) -> None:
    records = history(seed)
    one_by_one = feed(records, per_block_cuts(records))
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(records)), 4))  # batches of ~10 to ~500 records
    batched = feed(records, cuts)
    assert [f.model_dump() for f in batched] == [f.model_dump() for f in one_by_one]
    assert [f.model_dump() for f in feed(records, [])] == [f.model_dump() for f in one_by_one]


def test_the_histories_hold_window_rule_episodes_inside_one_batch() -> None:
    """The comparison above is not empty: the histories raise every window rule, and
    episodes that start and end between two of the batch cuts."""
    detectors: set[str] = set()
    for seed in range(12):
        records = history(seed)
        found = feed(records, per_block_cuts(records))
        detectors |= {f.detector for f in found}
    assert {"miner_share_rule", "miner_surge_rule", "empty_blocks_rule"} <= detectors


def test_batch_candidates_cover_every_block_where_a_rule_holds() -> None:
    """rule_heads may mark too many blocks, never too few: wherever the rules hold when
    run at every block, the block is a candidate."""
    c = FamilyConfig()
    for seed in range(6):
        records = [r for r in history(seed) if isinstance(r, Block)]
        records = [b for i, b in enumerate(records) if i == 0 or b.number > records[i - 1].number]
        heads = rule_heads(
            records[:100], records[100:], [], window_size=c.miner_window,
            share_limit=c.miner_share_limit, share_min_blocks=c.miner_min_blocks,
            empty_pending=c.empty_pending_threshold, empty_min_count=c.empty_min_count,
            surge_windows=c.surge_windows, surge_alpha=c.surge_alpha,
            surge_newcomer_alpha=c.surge_newcomer_alpha)
        assert heads.share is not None and heads.surge is not None
        marked = heads.share | heads.surge
        assert 0 < marked.sum() < len(marked)  # neither nothing nor everything
        family = MinerFamily(FamilyConfig())
        for b in records[:100]:
            family.blocks.append(b)
        for i, b in enumerate(records[100:]):
            family.blocks.append(b)
            assert family.window_hits(empty=False) == [] or bool(marked[i]), (seed, i)


@pytest.mark.parametrize("n", [3, 5, 8, 32])
def test_the_surge_table_never_rules_out_a_count_the_rule_would_flag(n: int) -> None:
    """Every count the rule's exact tail flags (at the looser of its two limits), after
    any prior from the rule's minimum to the full window, is at or above the table's
    smallest k; and the table is not vacuous (k_min <= n somewhere)."""
    c = FamilyConfig()
    limit = max(c.surge_alpha, c.surge_newcomer_alpha)
    table = _surge_k_min(n, c.miner_window - n, limit * SURGE_MARGIN)
    for prior in range(SURGE_MIN_PRIOR, c.miner_window - n + 1):
        for seen in range(prior + 1):
            for k in range(n + 1):
                if beta_binomial_tail(k, n, seen + 0.5, prior - seen + 0.5) < limit:
                    assert k >= table[seen], (n, prior, seen, k)
    assert (table <= n).any()


def test_window_candidates_cover_every_window_where_a_rule_holds_around_reorgs() -> None:
    """Where a height comes twice (rule_heads leaves such batches to it), the per-block
    check marks every window the share or surge rule holds over, and not every window."""
    c = FamilyConfig()
    marked = held = windows = 0
    for seed in range(6):
        family = MinerFamily(c)
        for b in (r for r in history(seed) if isinstance(r, Block)):
            family.blocks.append(b)
            share, surge = window_candidates(
                family._producers(), window_size=c.miner_window,
                share_limit=c.miner_share_limit,
                share_min_blocks=c.miner_min_blocks, surge_windows=c.surge_windows,
                surge_alpha=c.surge_alpha, surge_newcomer_alpha=c.surge_newcomer_alpha)
            hits = {h.rule for h in family.window_hits(empty=False)}
            assert share or "miner_share_rule" not in hits, seed
            assert surge or "miner_surge_rule" not in hits, seed
            windows += 1
            marked += share or surge
            held += bool(hits)
    assert 0 < held <= marked < windows
