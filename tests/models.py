"""Trained models for tests, saved as `chainwatch train` saves them (frozen in replay)."""

from __future__ import annotations

from pathlib import Path

from bench.synthetic import generate


def train_models(directory: Path, blocks: int, contamination: float) -> Path:
    """Block and tx models trained on `blocks` mainnet-shaped blocks of 10 txs."""
    from detector.training import MODEL_FILES, gather, train_block_model, train_tx_model

    history = gather(generate(blocks, 10, seed=21))
    for family, model in (
        ("block", train_block_model(history, kind="iforest", contamination=contamination,
                                    seed=1)),
        ("tx", train_tx_model(history, kind="iforest", contamination=contamination, seed=1)),
    ):
        assert model is not None
        model.save(directory / MODEL_FILES[family])
    return directory
