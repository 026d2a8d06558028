"""The timestamp rules computed for a whole batch at once (ClockWindow) find what the
former one-block-at-a-time code found, on histories with gaps, repeated heights,
backfill bursts, made-up stamps and jumps, in batches of every size."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import pytest

from chainwatch.schema import Block
from detector.families import FamilyConfig, MinerFamily, TxFamily, _stamp
from detector.rules import ClockWindow, RuleHit, Stamp, count_score, timestamp_drift_rule


def _drift_reference(
    window: Sequence[Stamp],
    *,
    chain_id: int,
    node: str,
    future_limit: float = 15.0,
    min_blocks: int = 10,
) -> RuleHit | None:
    """The former `timestamp_drift_rule`, one block at a time, kept unchanged as the
    reference the batch version must agree with (the rule's docstring says what it finds)."""
    if len(window) < min_blocks + 1:
        return None
    block, parent = window[-1], window[-2]
    if parent.number != block.number - 1:
        return None
    past = window[:-1]
    pairs = [(a, b) for a, b in pairwise(past) if b.number == a.number + 1]
    gaps = [b.timestamp - a.timestamp for a, b in pairs]
    if len(gaps) < min_blocks // 2:
        return None
    usual_gap = float(np.median(gaps))
    # the usual lead of blocks that arrived live: as far apart on arrival as in their
    # stamps. A backfill after an outage (fetched in a burst, stamped with when it was
    # fetched) and a manipulated block and its successors are left out of the reference
    lead = [b.timestamp - b.observed_at for a, b in pairs
            if abs((b.observed_at - a.observed_at) - (b.timestamp - a.timestamp))
            < max(usual_gap / 2, 1.0)]
    if len(lead) < min_blocks // 2:
        return None  # too few live arrivals to know this node's usual lead
    usual_lead = float(np.median(lead))
    excess = (block.timestamp - block.observed_at) - usual_lead
    interval = block.timestamp - parent.timestamp
    if excess > future_limit and interval > usual_gap:
        verdict, amount = "ahead of", excess
        limit = future_limit
    elif -excess > max(usual_gap / 2, 1.0) and interval < usual_gap / 2:
        verdict, amount = "behind", -excess
        limit = max(usual_gap / 2, 1.0)
    else:
        return None
    return RuleHit(
        rule="timestamp_drift_rule", family="miner", severity="warning",
        chain_id=chain_id, node=node, subject_kind="miner", subject=block.miner,
        block_number=block.number, score=count_score(amount, limit),
        summary=(f"block {block.number} by {block.miner} is stamped {amount:.0f}s {verdict} "
                 f"the time {node} received it, relative to the usual (interval to its "
                 f"parent {interval:.0f}s, usual {usual_gap:.0f}s)"),
        details={"excess_seconds": excess, "interval_seconds": interval,
                 "usual_interval_seconds": usual_gap},
    )


def _jump_reference(window: Sequence[Block], block: Block, limit: float) -> tuple | None:
    """MinerFamily._jump before: (excess, usual) of a jump, or None."""
    previous = window[-1] if window else None
    if previous is None or previous.number != block.number - 1 or len(window) < 10:
        return None
    stamps = np.array([b.timestamp for b in window], dtype=np.float64)
    usual = float(np.median(np.diff(stamps))) if len(stamps) > 1 else 0.0
    excess = block.timestamp - previous.timestamp - usual
    return (excess, usual) if excess > limit else None


def _history(seed: int, count: int = 400) -> list[Block]:
    rng = random.Random(seed)
    out, number, t, seen = [], 100, 1_700_000_000, 1_700_000_000.5
    for i in range(count):
        roll = rng.random()
        if roll < 0.05:
            number += rng.randint(2, 4)  # heights the node never saw
        elif roll < 0.08:
            number -= rng.randint(0, 2)  # a reorg: a height again
        else:
            number += 1
        step = rng.choice([12, 12, 12, 24, 13, 11]) if rng.random() > 0.02 else 400  # a halt
        t += step
        seen = (seen + 0.01 if rng.random() < 0.1 else t + rng.uniform(0.2, 3.0))  # bursts
        stamp = t
        if rng.random() < 0.03:
            stamp += rng.choice([40, 200, 600])  # ahead, or a jump
        elif rng.random() < 0.03:
            stamp -= rng.choice([8, 30])  # backdated
        out.append(Block(chain_id=1, node="n", event_id=f"b{i}", observed_at=seen,
                         number=number, hash=f"0x{i:064x}", parent_hash="0x", timestamp=stamp,
                         miner=f"0xM{i % 7}", gas_used=1, gas_limit=30_000_000, tx_count=0))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_a_batch_at_once_finds_what_one_block_at_a_time_found(seed):
    rng = random.Random(seed)
    config = FamilyConfig()
    history = _history(seed)
    family, txs = MinerFamily(config), TxFamily(config, kind="iforest", seed=1)
    stamps: deque[Stamp] = deque(maxlen=config.miner_window)
    blocks: deque[Block] = deque(maxlen=config.miner_window)
    # (detector, height, summary, score) for drift; (detector, height) for jumps
    expected: list[tuple[object, ...]] = []
    found: list[tuple[object, ...]] = []
    start = 0
    while start < len(history):
        batch = history[start:start + rng.choice([1, 1, 2, 7, 50, 150])]
        start += len(batch)
        for b in batch:
            hit = _drift_reference([*stamps, _stamp(b)], chain_id=1, node="n",
                                   future_limit=config.timestamp_future_seconds)
            if hit is not None:
                expected.append(("timestamp_drift_rule", b.number, hit.summary, hit.score))
            else:
                jump = _jump_reference(blocks, b, config.timestamp_jump_seconds)
                if jump is not None:
                    expected.append(("timestamp_jump_rule", b.number))
            stamps.append(_stamp(b))
            blocks.append(b)
        for f in family.on_blocks(batch, txs, now=batch[-1].observed_at):
            if f.detector == "timestamp_drift_rule":
                found.append((f.detector, f.block_number, f.summary, f.score))
            elif f.detector == "timestamp_jump_rule":
                found.append((f.detector, f.block_number))
    assert found == expected
    assert {e[0] for e in expected} == {"timestamp_drift_rule", "timestamp_jump_rule"}


@pytest.mark.parametrize("seed", range(6))
def test_the_one_window_rule_is_the_former_rule(seed):
    history = _history(seed, 150)
    stamps = [_stamp(b) for b in history]
    for end in range(1, len(stamps) + 1):
        window = stamps[max(0, end - 101):end]
        assert timestamp_drift_rule(window, chain_id=1, node="n") == _drift_reference(
            window, chain_id=1, node="n")


@pytest.mark.parametrize("seed", range(8))
def test_the_clock_checks_skip_only_blocks_they_cannot_flag(seed, monkeypatch):
    """`_clock_suspects` narrows the per-block checks to a few rows; running them on
    every row instead finds exactly the same."""
    history = _history(seed, 600)
    config = FamilyConfig()

    def run() -> list[tuple[object, ...]]:
        family, txs = MinerFamily(config), TxFamily(config, kind="iforest", seed=1)
        rng = random.Random(seed)
        out: list[tuple[object, ...]] = []
        start = 0
        while start < len(history):
            batch = history[start:start + rng.choice([1, 3, 50, 200])]
            start += len(batch)
            out += [(f.detector, f.block_number, f.summary, f.score)
                    for f in family.on_blocks(batch, txs, now=batch[-1].observed_at)
                    if f.detector in ("timestamp_drift_rule", "timestamp_jump_rule")]
        return out

    checked: list[int] = []
    narrowed = MinerFamily._clock_suspects

    def counting(self, clock):
        mask = narrowed(self, clock)
        checked.append(int(mask.sum()))
        return mask

    monkeypatch.setattr(MinerFamily, "_clock_suspects", counting)
    found = run()
    monkeypatch.setattr(MinerFamily, "_clock_suspects",
                        lambda self, clock: np.ones(len(clock.known), dtype=bool))
    assert found == run()
    assert found  # the histories hold made-up stamps and jumps
    assert sum(checked) < len(history) / 4  # most blocks skip the per-block checks


def _row_medians(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's median over its non-NaN values (np.median's) and their count."""
    counts = np.count_nonzero(~np.isnan(values), axis=1)
    if values.shape[1] == 0:
        return np.full(len(values), np.nan), counts
    ordered = np.sort(values, axis=1)  # NaN last
    rows = np.arange(len(values))
    low = ordered[rows, np.maximum(counts - 1, 0) // 2]
    high = ordered[rows, np.minimum(counts // 2, values.shape[1] - 1)]
    middle = np.where(counts % 2 == 1, low, (low + high) / 2.0)
    return np.where(counts > 0, middle, np.nan), counts


def _clock_window_numpy(stamps: Sequence[Stamp], first: int, window: int) -> ClockWindow:
    """`ClockWindow.of` in numpy's steps (as it was before the compiled pass): each row's
    window of pairs as a matrix, medians by sorting its rows."""
    ts = np.array([s.timestamp for s in stamps], dtype=np.float64)
    seen = np.array([s.observed_at for s in stamps], dtype=np.float64)
    numbers = np.array([s.number for s in stamps], dtype=np.int64)
    positions = np.arange(first, len(stamps))
    pair = positions[:, None] - window + np.arange(max(window - 1, 0))[None, :]
    inside = pair >= 0
    at = np.clip(pair, 0, max(len(stamps) - 2, 0))
    consecutive = np.append(numbers[1:] == numbers[:-1] + 1, False)[at] & inside
    gap = np.append(ts[1:] - ts[:-1], np.nan)[at]
    usual_gap, gaps = _row_medians(np.where(consecutive, gap, np.nan))
    mismatch = np.append(np.abs((seen[1:] - seen[:-1]) - (ts[1:] - ts[:-1])), np.nan)[at]
    live = consecutive & (mismatch < np.maximum(usual_gap / 2, 1.0)[:, None])
    lead = np.append(ts[1:] - seen[1:], np.nan)[at]
    usual_lead, leads = _row_medians(np.where(live, lead, np.nan))
    usual_interval, _ = _row_medians(np.where(inside, gap, np.nan))
    before = np.maximum(positions - 1, 0)
    follows = (positions > 0) & (numbers[before] == numbers[positions] - 1)
    interval = np.where(positions > 0, ts[positions] - ts[before], np.nan)
    return ClockWindow(usual_gap, gaps, usual_lead, leads, usual_interval, follows,
                       np.minimum(positions, window), interval,
                       ts[positions] - seen[positions])


@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_window_figures_are_numpys(seed):
    """Every figure of the compiled pass equals numpy's steps bit for bit, for windows
    and batch starts of every size (gaps, repeated heights, bursts, halts)."""
    rng = random.Random(seed)
    stamps = [_stamp(b) for b in _history(seed, 300)]
    for window in (0, 1, 2, 3, 10, 100, 400):
        for first in (0, 1, 2, rng.randrange(len(stamps)), len(stamps) - 1, len(stamps)):
            got = ClockWindow.of(stamps, first, window)
            want = _clock_window_numpy(stamps, first, window)
            for name in ClockWindow.__dataclass_fields__:
                a, b = getattr(got, name), getattr(want, name)
                assert a.dtype.kind == b.dtype.kind, name
                assert np.array_equal(a, b, equal_nan=True), (name, window, first)
