"""Findings on normal traffic at mainnet shape: what chainwatch flags where nothing was injected.

    python -m bench.normal_findings --blocks 10000 --seeds 1 2 3

docs/quality.md measures false findings on the scenario runner's anvil traffic (~1,700
normal blocks, narrow fee spread). This runs the live Detector (default configuration:
warm-up, refits) over bench/synthetic's mainnet-shaped history, in which no anomaly is
injected: lognormal tips (sigma 1.2), Zipf-like bots, 1 % missed slots. It prints each
detector's findings per 1,000 blocks and, for the transaction model, how far the flagged
txs' tips are from the median tip of their block, and how many txs' tips reach 5, 5.5
and 6 market spreads in log space (`priority_fee_log_z`, whose cut is 6): the
fee_outlier scenario labels a tip of 50-1000x a narrow market as an anomaly, and a
lognormal market makes tips hundreds of times its median by itself.
Blocks are generated as they are fed (~5 ms each), so memory stays flat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from bench.synthetic import stream
from chainwatch.schema import Block, Finding
from detector.tx_features import effective_tip

BATCH_BLOCKS = 500  # replay's batch
FEE_SPREADS = (5.0, 5.5, 6.0)  # tip log z-scores counted: the cut is 6


def _batches(blocks: Iterator[Block]) -> Iterator[list[Block]]:
    batch: list[Block] = []
    for block in blocks:
        batch.append(block)
        if len(batch) == BATCH_BLOCKS:
            yield batch
            batch = []
    if batch:
        yield batch


def run_seed(blocks: int, txs_per_block: float, seed: int) -> dict[str, Any]:
    from chainwatch.metrics import Metrics
    from detector.engine import Detector, DetectorConfig
    from replay.driver import ReplayClock

    clock = ReplayClock()
    detector = Detector(DetectorConfig(), Metrics(), clock=clock)
    by_detector: Counter[str] = Counter()
    by_severity: Counter[str] = Counter()
    tip_multiples: list[float] = []
    fee_tail: Counter[float] = Counter()
    txs = 0
    examples: dict[str, str] = {}
    started = time.monotonic()
    for batch in _batches(stream(blocks, txs_per_block, seed)):
        clock.now = batch[-1].observed_at
        market = detector.tx_family(batch[0].chain_id).market  # what the batch is scored on
        tips = np.array([effective_tip(t, b.base_fee_per_gas) or 0
                         for b in batch for t in b.transactions], dtype=np.float64)
        txs += len(tips)
        if market.blocks:
            spreads = market.tip_log_z(tips)
            fee_tail.update({k: int((spreads >= k).sum()) for k in FEE_SPREADS})
        findings: list[Finding] = [*detector.process(list(batch)), *detector.tick()]
        flagged = {f.subject for f in findings if f.detector == "tx_iforest"}
        for block in batch if flagged else ():
            block_tips = [effective_tip(t, block.base_fee_per_gas) or 0
                          for t in block.transactions]
            median = statistics.median(block_tips) if block_tips else 0
            for tx, tip in zip(block.transactions, block_tips, strict=True):
                if tx.hash in flagged and median > 0:
                    tip_multiples.append(tip / median)
        for f in findings:
            examples.setdefault(f.detector, f.summary[:240])
            by_detector[f.detector] += 1
            by_severity[f.severity] += 1
    return {
        "seed": seed,
        "blocks": blocks,
        "findings": sum(by_detector.values()),
        "per_1000_blocks": round(1000 * sum(by_detector.values()) / blocks, 2),
        "by_detector": dict(by_detector.most_common()),
        "by_severity": dict(by_severity.most_common()),
        "tx_tip_multiple_of_block_median": _spread(tip_multiples),
        "txs": txs,
        "txs_with_tip_log_z_at_least": {str(k): fee_tail[k] for k in FEE_SPREADS},
        "wall_s": round(time.monotonic() - started, 1),
        "first_summary": examples,
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)
    return {"min": round(values[0], 1), "median": round(statistics.median(values), 1),
            "max": round(values[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10_000)
    parser.add_argument("--txs-per-block", type=float, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    totals: Counter[str] = Counter()
    fee_tail: Counter[str] = Counter()
    blocks = txs = 0
    for seed in args.seeds:
        result = run_seed(args.blocks, args.txs_per_block, seed)
        print(json.dumps(result), flush=True)
        totals.update(result["by_detector"])
        fee_tail.update(result["txs_with_tip_log_z_at_least"])
        blocks += args.blocks
        txs += result["txs"]
    print(f"{blocks} normal blocks, {sum(totals.values())} findings "
          f"({1000 * sum(totals.values()) / blocks:.2f} per 1,000 blocks):")
    for name, count in totals.most_common():
        print(f"  {name:<28} {count:>5}  {1000 * count / blocks:6.2f} per 1,000 blocks")
    print(f"{txs} txs; tips at least k market spreads above the market in log space:")
    for k, count in fee_tail.items():
        rate = f"1 in {txs // count:,}" if count else "none"
        print(f"  k = {k:<4} {count:>6} txs  ({rate})")


if __name__ == "__main__":
    main()
