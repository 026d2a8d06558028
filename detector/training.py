"""`chainwatch train`: fit models from recorded history and save them, versioned.

History comes as chainwatch records (from the Kafka topics, or a JSONL archive: one
record per line). Features are computed exactly as on the live path (ChainState links
parents, `block_features` does the rest), so a trained model sees what it will score.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chainwatch.exceptions import ChainwatchError, InvalidRecord
from chainwatch.schema import AnyRecord, Block, Reorg, decode
from detector.families import FamilyConfig, TxFamily
from detector.features import (
    BLOCK_FEATURE_MEDIAN_SCALE,
    BLOCK_FEATURE_MIN_SCALE,
    BLOCK_FEATURES,
    BlockRow,
    block_features,
    block_input_frame,
    block_row,
)
from detector.models import AnomalyDetector
from detector.state import ChainState, SeenIds
from detector.tx_features import TX_FEATURE_MIN_SCALE, TX_FEATURES

log = logging.getLogger("chainwatch.train")

MODEL_FILES = {"block": "block.joblib", "tx": "tx.joblib"}
TX_TRAIN_ROWS = 200_000  # the most recent transactions are the ones that say what normal is


@dataclass
class History:
    """Feature rows gathered from records, with what was read and skipped."""

    block_rows: list[BlockRow] = field(default_factory=list)
    records: int = 0
    duplicates: int = 0
    invalid: list[str] = field(default_factory=list)  # where and why, of each kept sample
    invalid_unlisted: int = 0  # skipped beyond a source's sample (counted, not listed)
    first_block: int | None = None
    last_block: int | None = None
    first_time: float | None = None
    last_time: float | None = None
    # per chain, the live transaction pipeline with a model that never fits: it computes
    # features exactly as `detect` will (score-then-learn order) and keeps the rows
    tx: dict[int, TxFamily] = field(default_factory=dict)

    @property
    def invalid_count(self) -> int:
        return len(self.invalid) + self.invalid_unlisted

    def tx_matrix(self) -> np.ndarray:
        rows = [row for family in self.tx.values() for row in family.model.history]
        return np.vstack(rows) if rows else np.empty((0, len(TX_FEATURES)))


def _tx_tap(history: History, chain_id: int) -> TxFamily:
    family = history.tx.get(chain_id)
    if family is None:
        config = FamilyConfig(tx_warmup=2**62, tx_history=TX_TRAIN_ROWS)
        family = history.tx[chain_id] = TxFamily(config, kind="iforest", seed=0)
    return family


def gather(records: Iterable[AnyRecord], history: History | None = None) -> History:
    history = history or History()
    state = ChainState()
    seen = SeenIds(capacity=5_000_000)
    for record in records:
        history.records += 1
        if not seen.add(record.event_id):
            history.duplicates += 1
            continue
        if isinstance(record, Reorg):
            state.apply_reorg(record)
        elif isinstance(record, Block):
            history.block_rows.append(block_row(record, state.apply_block(record)))
            _tx_tap(history, record.chain_id).on_blocks([record], record.observed_at)
            n, t = record.number, float(record.timestamp)
            history.first_block = n if history.first_block is None else min(history.first_block, n)
            history.last_block = n if history.last_block is None else max(history.last_block, n)
            history.first_time = t if history.first_time is None else min(history.first_time, t)
            history.last_time = t if history.last_time is None else max(history.last_time, t)
    return history


def read_jsonl(path: Path, history: History) -> Iterable[AnyRecord]:
    """Records from a JSONL archive; invalid lines are reported with their number."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ChainwatchError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield decode(line)
            except InvalidRecord as exc:
                history.invalid.append(f"{path.name}:{number}: {exc}")


def block_matrix(history: History) -> np.ndarray:
    if not history.block_rows:
        return np.empty((0, len(BLOCK_FEATURES)))
    frame = block_features(block_input_frame(history.block_rows))
    return frame.drop_nulls(subset=list(BLOCK_FEATURES)).select(BLOCK_FEATURES).to_numpy()


def train_block_model(
    history: History, *, kind: str, contamination: float, seed: int, min_rows: int = 50
) -> AnomalyDetector:
    x = block_matrix(history)
    if len(x) < min_rows:
        raise ChainwatchError(
            f"not enough history to train: {len(x)} complete blocks, need at least {min_rows}"
        )
    model = AnomalyDetector("block", BLOCK_FEATURES, kind=kind, contamination=contamination,
                            seed=seed, min_scale=BLOCK_FEATURE_MIN_SCALE,
                            median_scale=BLOCK_FEATURE_MEDIAN_SCALE)
    model.fit(x, {"first_block": history.first_block, "last_block": history.last_block,
                  "first_timestamp": history.first_time, "last_timestamp": history.last_time,
                  "rows": len(x)})
    return model


def train_tx_model(
    history: History, *, kind: str, contamination: float, seed: int, min_rows: int = 1000
) -> AnomalyDetector | None:
    """The transaction model, or None when the history holds too few transactions."""
    x = history.tx_matrix()
    if len(x) < min_rows:
        return None
    config = FamilyConfig()
    model = AnomalyDetector("tx", TX_FEATURES, kind=kind, contamination=contamination,
                            seed=seed, min_scale=TX_FEATURE_MIN_SCALE,
                            z_limit=config.tx_min_deviation,
                            tail_factor=config.tx_tail_factor,
                            feature_cuts=config.tx_feature_cuts())
    model.fit(x, {"first_block": history.first_block, "last_block": history.last_block,
                  "rows": len(x)})
    return model


FEATURES_OF = {"block": BLOCK_FEATURES, "tx": TX_FEATURES}


def load_models(directory: Path) -> dict[str, AnomalyDetector]:
    """Models saved by `chainwatch train`; a schema mismatch is a one-line ModelError."""
    models: dict[str, AnomalyDetector] = {}
    for family, name in MODEL_FILES.items():
        path = directory / name
        if path.exists():
            models[family] = AnomalyDetector.load(path, family, FEATURES_OF[family])
    if not models:
        expected = ", ".join(MODEL_FILES.values())
        raise ChainwatchError(f"no models in {directory} (expected {expected})")
    return models
