"""Compiling the detector's numba kernels before the first batch needs them.

Where numba's on-disk cache is empty (a fresh install, a new container) the kernels
compile on first use, ~10 s on 2 cores. In a service that would hold back the first
batch's findings and metrics by as much; `compile_in_background` starts the compiling
with the service instead, so it overlaps connecting to the nodes and the backfill.
With the cache filled it takes a fraction of a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import numpy as np

from chainwatch.schema import Block, TxSummary
from detector.families import FamilyConfig, MinerFamily, TxFamily
from detector.forest import CompiledForest
from detector.models import AnomalyDetector, _deviations_of

log = logging.getLogger("chainwatch.detector")

_GWEI = 10**9


def _blocks(count: int = 4, txs: int = 6) -> list[Block]:
    """A few made-up linked blocks whose txs take every path of the tx features: known
    and new senders, calls and transfers, type 2 and legacy fees."""
    blocks, parent = [], "0x" + "00" * 32
    for number in range(count):
        summaries = tuple(
            TxSummary(
                hash=f"0x{number:032x}{i:032x}", transaction_index=i,
                from_address=f"0x{i % 3 + number % 2:040x}", to_address=f"0x{7:040x}",
                value=i * _GWEI, gas=21_000 + 1_000 * i,
                gas_price=None if i % 2 else (20 + i) * _GWEI,
                max_fee_per_gas=(30 + i) * _GWEI if i % 2 else None,
                max_priority_fee_per_gas=(1 + i) * _GWEI if i % 2 else None,
                nonce=number, tx_type=2 if i % 2 else 0, input_size=4 * (i % 2),
                method_id=f"0x{i % 2:08x}" if i % 2 else None, is_contract_creation=False,
            )
            for i in range(txs)
        )
        block_hash = f"0x{number + 1:064x}"
        blocks.append(Block(
            chain_id=1, node="warm-up", event_id=Block.id_for(1, "warm-up", block_hash),
            observed_at=1_700_000_000.0 + 12 * number, number=number, hash=block_hash,
            parent_hash=parent, timestamp=1_700_000_000 + 12 * number, miner=f"0x{9:040x}",
            gas_used=15_000_000, gas_limit=30_000_000, base_fee_per_gas=10 * _GWEI,
            tx_count=len(summaries), transactions=summaries,
        ))
        parent = block_hash
    return blocks


def _run_family_kernels() -> None:
    """The tx and miner families' kernels, on made-up blocks (no model scores them)."""
    family = TxFamily(FamilyConfig(), kind="iforest", seed=0)
    blocks = _blocks()
    family.on_blocks(blocks, blocks[-1].observed_at, block_nows=[b.observed_at for b in blocks])
    MinerFamily(FamilyConfig()).on_blocks(blocks, family, blocks[-1].observed_at)  # clock


def compile_kernels() -> float:
    """Run every compiled kernel once, on the argument types the detector passes (a test
    checks a detector and a replay then compile nothing more); the seconds it took."""
    from sklearn.ensemble import IsolationForest  # (~1 s: only here, not at import)

    started = time.perf_counter()
    _run_family_kernels()
    x = np.random.default_rng(0).random((64, 4))
    forest = IsolationForest(n_estimators=2, max_samples=32, random_state=0).fit(x)
    CompiledForest(forest).score_samples(x)
    ones, largest, past = np.ones(4), np.empty(64), np.empty(64)
    _deviations_of(x, np.zeros(4), ones, ones, largest, past)  # a model's score
    return time.perf_counter() - started


def load_kernels(models: Iterable[AnomalyDetector]) -> float:
    """`compile_kernels` for a detector of trained models (replay with --models): each
    kernel loaded from numba's cache (compiled where it is not), numba's own start-up
    included, in the start-up rather than in the replay's first batches (~0.4 s with the
    cache filled). No forest is fitted and scikit-learn is not imported: the trained
    models score a few rows instead. The seconds it took."""
    started = time.perf_counter()
    _run_family_kernels()
    for model in models:
        if model.fitted:  # (a saved model always is)
            model.score(np.zeros((2, len(model.feature_names))))
    return time.perf_counter() - started


def _compile_and_log() -> None:
    try:
        seconds = compile_kernels()
    except Exception as exc:  # the first batch compiles them then; never stop the service
        log.warning("compiling the detector's kernels ahead failed",
                    extra={"error": f"{type(exc).__name__}: {exc}"})
        return
    log.info("detector kernels compiled", extra={"seconds": round(seconds, 2)})


def compile_in_background() -> threading.Thread:
    """Start `compile_kernels` on a daemon thread (the service does not wait for it)."""
    thread = threading.Thread(target=_compile_and_log, name="compile-kernels", daemon=True)
    thread.start()
    return thread
