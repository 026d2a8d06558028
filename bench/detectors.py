"""Detector speed: batch transaction scoring and block arrival -> findings on the live path.

    .venv/bin/python -m bench.detectors [--blocks 1200] [--txs 200]

Run with one thread per library (this script sets POLARS_MAX_THREADS, OMP and BLAS to 1
before importing them) so "per core" means one core. Prints figures for
docs/performance.md; asserts nothing.

- batch: features + model over many blocks' transactions in one call (how replay and a
  catching-up detector score), after the model was fitted;
- live: one `Detector.process([block])` per block of ~200 txs with every family on (block
  model, transactions, miners, fork risk), timed from the call to its findings; the
  first `warmup` blocks (model fits) are left out and refit blocks reported apart.
"""

from __future__ import annotations

import os

for _var in ("POLARS_MAX_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.synthetic import generate  # noqa: E402
from chainwatch.metrics import Metrics  # noqa: E402
from detector.engine import Detector, DetectorConfig  # noqa: E402
from detector.families import FamilyConfig, TxFamily  # noqa: E402
from detector.tx_features import TX_FEATURES, blocks_to_tx_frame, tx_features  # noqa: E402


def batch(blocks: list, train_blocks: int) -> dict[str, float]:
    """Score the txs of all blocks after `train_blocks` in one call; tx/s through each stage."""
    family = TxFamily(FamilyConfig(), kind="iforest", seed=42)
    for b in blocks[:train_blocks]:  # fit the model and fill the fee/selector/sender state
        family.on_blocks([b], b.observed_at)
    rest = blocks[train_blocks:]
    now = rest[-1].observed_at
    t0 = time.perf_counter()
    frame = blocks_to_tx_frame(rest)
    t1 = time.perf_counter()
    features = tx_features(frame, family.market, family.selectors, family.senders,
                           family.replacements, family.pending_since, now=now).fill_null(0.0)
    x = features.select(TX_FEATURES).to_numpy()
    t2 = time.perf_counter()
    scored = family.model.score(x)
    t3 = time.perf_counter()
    assert scored is not None
    n = len(x)
    return {
        "transactions": n,
        "frame_tx_per_s": n / (t1 - t0),
        "features_tx_per_s": n / (t2 - t1),
        "model_tx_per_s": n / (t3 - t2),
        "features_and_model_tx_per_s": n / (t3 - t1),
        "end_to_end_tx_per_s": n / (t3 - t0),
    }


def _fits(detector: Detector) -> tuple[int, int]:
    tx, block = detector.tx.get(1), detector.models.get(1)
    return (tx.model.fits if tx else 0, block.fits if block else 0)


def live(blocks: list, warmup: int) -> dict[str, float]:
    """Per-block latency of Detector.process with every family on."""
    now = [0.0]
    detector = Detector(DetectorConfig(), Metrics(), clock=lambda: now[0])
    steady: list[float] = []
    refits: list[float] = []
    for i, b in enumerate(blocks):
        now[0] = b.observed_at
        fits_before = _fits(detector)
        t0 = time.perf_counter()
        detector.process([b])
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            (refits if _fits(detector) != fits_before else steady).append(elapsed)
    ms = np.array(steady) * 1e3
    return {
        "blocks_timed": len(steady),
        "txs_per_block": float(np.mean([b.tx_count for b in blocks[warmup:]])),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "refit_blocks": len(refits),
        "refit_max_ms": max(refits, default=0.0) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1200)
    parser.add_argument("--txs", type=float, default=200)
    args = parser.parse_args()
    print(f"generating {args.blocks} mainnet-shaped blocks, ~{args.txs:.0f} txs each ...")
    blocks = generate(args.blocks, args.txs, seed=11)
    b = batch(blocks, train_blocks=200)
    print(f"batch scoring of {b['transactions']:,} txs (one core):")
    for key in ("frame_tx_per_s", "features_tx_per_s", "model_tx_per_s",
                "features_and_model_tx_per_s", "end_to_end_tx_per_s"):
        print(f"  {key:<30} {b[key]:>12,.0f}")
    lv = live(blocks, warmup=300)
    print(f"live path, {lv['blocks_timed']} blocks of ~{lv['txs_per_block']:.0f} txs, "
          f"block -> findings: p50 {lv['p50_ms']:.1f} ms, p99 {lv['p99_ms']:.1f} ms, "
          f"max {lv['max_ms']:.1f} ms; {lv['refit_blocks']} block(s) with a model refit, "
          f"slowest {lv['refit_max_ms']:.0f} ms")


if __name__ == "__main__":
    main()
