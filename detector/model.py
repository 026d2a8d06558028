"""The live block model: an AnomalyDetector that warms up and refits on a schedule.

Without a trained model the detector learns from the stream: the first fit after
`warmup` complete blocks, then a refit every `refit_every` blocks on the last `history`.
A model trained with `chainwatch train` and loaded at start is used as it is (frozen):
what was evaluated is what runs.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from chainwatch.schema import FeatureDeviation
from detector.models import AnomalyDetector, Scored

__all__ = ["BlockAnomalyModel", "Scored"]


class BlockAnomalyModel:
    def __init__(
        self,
        feature_names: tuple[str, ...],
        *,
        warmup: int = 200,
        refit_every: int = 1000,
        history: int = 5000,
        contamination: float = 0.01,
        n_estimators: int = 100,
        seed: int = 42,
        min_scale: tuple[float, ...] | None = None,
        z_limit: float = 12.0,
        kind: str = "iforest",
        family: str = "block",
        pretrained: AnomalyDetector | None = None,
    ) -> None:
        self.feature_names = feature_names
        self.warmup = warmup
        self.refit_every = refit_every
        self.frozen = pretrained is not None
        self.detector = pretrained or AnomalyDetector(
            family, feature_names, kind=kind, contamination=contamination, seed=seed,
            n_estimators=n_estimators, min_scale=min_scale, z_limit=z_limit,
        )
        self._rows: deque[np.ndarray] = deque(maxlen=history)
        self._since_fit = 0
        self.fits = 0

    @property
    def history(self) -> tuple[np.ndarray, ...]:
        """The rows kept for the next (re)fit, oldest first."""
        return tuple(self._rows)

    @property
    def fitted(self) -> bool:
        return self.detector.fitted

    @property
    def version(self) -> str | None:
        return self.detector.version

    def score(self, x: np.ndarray) -> Scored | None:
        """Score rows with the current model (None while warming up)."""
        if not self.detector.fitted or len(x) == 0:
            return None
        return self.detector.score(x)

    def learn(self, x: np.ndarray) -> bool:
        """Add rows to the training history; fit or refit when due. True if it (re)fitted."""
        if self.frozen:
            return False
        for row in x:
            self._rows.append(row)
        self._since_fit += len(x)
        due = (not self.detector.fitted and len(self._rows) >= self.warmup) or (
            self.detector.fitted and self._since_fit >= self.refit_every
        )
        if due:
            self.detector.fit(np.vstack(self._rows), {"source": "live", "rows": len(self._rows)})
            self._since_fit = 0
            self.fits += 1
        return due

    def explain(self, row: np.ndarray, top: int = 3) -> tuple[FeatureDeviation, ...]:
        return self.detector.explain(row, top)
