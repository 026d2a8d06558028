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
import polars as pl

from chainwatch.exceptions import ChainwatchError, InvalidRecord
from chainwatch.schema import AnyRecord, Block, Reorg, decode
from detector.features import (
    BLOCK_FEATURE_MIN_SCALE,
    BLOCK_FEATURES,
    BLOCK_INPUT_SCHEMA,
    block_features,
    block_row,
)
from detector.models import AnomalyDetector
from detector.state import ChainState, SeenIds

log = logging.getLogger("chainwatch.train")

MODEL_FILES = {"block": "block.joblib"}


@dataclass
class History:
    """Feature rows gathered from records, with what was read and skipped."""

    block_rows: list[dict[str, object]] = field(default_factory=list)
    records: int = 0
    duplicates: int = 0
    invalid: list[str] = field(default_factory=list)
    first_block: int | None = None
    last_block: int | None = None
    first_time: float | None = None
    last_time: float | None = None


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
    frame = block_features(pl.DataFrame(history.block_rows, schema=BLOCK_INPUT_SCHEMA))
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
                            seed=seed, min_scale=BLOCK_FEATURE_MIN_SCALE)
    model.fit(x, {"first_block": history.first_block, "last_block": history.last_block,
                  "first_timestamp": history.first_time, "last_timestamp": history.last_time,
                  "rows": len(x)})
    return model


def load_models(directory: Path) -> dict[str, AnomalyDetector]:
    """Models saved by `chainwatch train`; a schema mismatch is a one-line ModelError."""
    models: dict[str, AnomalyDetector] = {}
    block = directory / MODEL_FILES["block"]
    if block.exists():
        models["block"] = AnomalyDetector.load(block, "block", BLOCK_FEATURES)
    if not models:
        raise ChainwatchError(f"no models in {directory} (expected {MODEL_FILES['block']})")
    return models
